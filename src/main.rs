fn main() {
    println!("macvhost: under construction");
}
