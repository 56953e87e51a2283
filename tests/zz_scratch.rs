#[test]
fn repro() {
    let p = std::env::var("REPRO").unwrap();
    let t = std::env::var("TARGET").unwrap();
    macvhost::fuzzing::run(&t, &std::fs::read(p).unwrap());
}
