/*
 * mvh-mcast: IPv4 multicast membership and traffic for the macvhost test guest.
 * Built with `gcc -static` by build-guest.sh into /usr/bin/mvh-mcast.
 *
 *   mvh-mcast recv IFACE GROUP PORT SECONDS
 *       Joins GROUP on IFACE (IP_ADD_MEMBERSHIP), prints "joined GROUP", counts the UDP
 *       datagrams to GROUP:PORT for SECONDS, prints "count=N", leaves the group
 *       (IP_DROP_MEMBERSHIP: the kernel sends a leave) and prints "left GROUP".
 *   mvh-mcast send IFACE GROUP PORT COUNT
 *       Sends COUNT datagrams to GROUP:PORT out of IFACE (TTL 1, looped back to local
 *       members), prints "sent=N".
 *   mvh-mcast join-many IFACE FIRST COUNT SECONDS
 *       Joins COUNT (<= 100000) groups FIRST, FIRST+1, ... on IFACE (raises
 *       net.ipv4.igmp_max_memberships when it is lower; a new socket whenever one is full),
 *       prints "joined=N sockets=S" (and "error=..." with the first failure), holds them
 *       for SECONDS (SIGTERM/SIGINT end the hold early), leaves them all and prints
 *       "left=N".
 *
 * SECONDS may have a fraction. Exit status: 0 on success, 1 on a failure (printed on stderr
 * with the cause), 2 on bad usage. Output is flushed line by line so a script can wait for
 * "joined".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: mvh-mcast recv IFACE GROUP PORT SECONDS\n"
            "       mvh-mcast send IFACE GROUP PORT COUNT\n"
            "       mvh-mcast join-many IFACE FIRST COUNT SECONDS\n");
    exit(2);
}

static unsigned ifindex_of(const char *iface)
{
    unsigned idx = if_nametoindex(iface);
    if (idx == 0) {
        fprintf(stderr, "mvh-mcast: no interface %s: %s\n", iface, strerror(errno));
        exit(1);
    }
    return idx;
}

static struct in_addr group_of(const char *s)
{
    struct in_addr a;
    if (inet_pton(AF_INET, s, &a) != 1 || !IN_MULTICAST(ntohl(a.s_addr))) {
        fprintf(stderr, "mvh-mcast: %s is not an IPv4 multicast address\n", s);
        exit(2);
    }
    return a;
}

static long number(const char *s, long min, long max)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *s == '\0' || *end != '\0' || v < min || v > max) {
        fprintf(stderr, "mvh-mcast: %s is not a number in %ld..%ld\n", s, min, max);
        exit(2);
    }
    return v;
}

static double seconds(const char *s)
{
    char *end;
    double v = strtod(s, &end);
    if (*s == '\0' || *end != '\0' || !(v >= 0 && v <= 86400)) {
        fprintf(stderr, "mvh-mcast: %s is not a duration in seconds\n", s);
        exit(2);
    }
    return v;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int udp_socket(void)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        perror("mvh-mcast: socket");
        exit(1);
    }
    return fd;
}

static int membership(int fd, int op, struct in_addr group, unsigned ifindex)
{
    struct ip_mreqn m;
    memset(&m, 0, sizeof(m));
    m.imr_multiaddr = group;
    m.imr_ifindex = (int)ifindex;
    return setsockopt(fd, IPPROTO_IP, op, &m, sizeof(m));
}

static void install_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
}

static int cmd_recv(char **argv)
{
    unsigned ifindex = ifindex_of(argv[0]);
    struct in_addr group = group_of(argv[1]);
    uint16_t port = (uint16_t)number(argv[2], 1, 65535);
    double secs = seconds(argv[3]);
    int fd = udp_socket();
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    /* Bound to the group: only its datagrams, not other groups' on the same port. */
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr = group};
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        perror("mvh-mcast: bind");
        return 1;
    }
    if (membership(fd, IP_ADD_MEMBERSHIP, group, ifindex) < 0) {
        perror("mvh-mcast: IP_ADD_MEMBERSHIP");
        return 1;
    }
    install_signals();
    printf("joined %s\n", argv[1]);
    fflush(stdout);
    long count = 0;
    double end = now() + secs;
    char buf[65536];
    while (!stop_requested) {
        double left = end - now();
        if (left <= 0)
            break;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int r = poll(&p, 1, (int)(left * 1000) + 1);
        if (r < 0 && errno != EINTR) {
            perror("mvh-mcast: poll");
            return 1;
        }
        if (r <= 0)
            continue;
        /* Drain what is there. */
        while (recv(fd, buf, sizeof(buf), MSG_DONTWAIT) >= 0)
            count++;
    }
    printf("count=%ld\n", count);
    fflush(stdout);
    if (membership(fd, IP_DROP_MEMBERSHIP, group, ifindex) < 0) {
        perror("mvh-mcast: IP_DROP_MEMBERSHIP");
        return 1;
    }
    printf("left %s\n", argv[1]);
    close(fd);
    return 0;
}

static int cmd_send(char **argv)
{
    unsigned ifindex = ifindex_of(argv[0]);
    struct in_addr group = group_of(argv[1]);
    uint16_t port = (uint16_t)number(argv[2], 1, 65535);
    long n = number(argv[3], 0, 100000000);
    int fd = udp_socket();
    struct ip_mreqn m;
    memset(&m, 0, sizeof(m));
    m.imr_ifindex = (int)ifindex;
    unsigned char ttl = 1, loop = 1;
    if (setsockopt(fd, IPPROTO_IP, IP_MULTICAST_IF, &m, sizeof(m)) < 0 ||
        setsockopt(fd, IPPROTO_IP, IP_MULTICAST_TTL, &ttl, sizeof(ttl)) < 0 ||
        setsockopt(fd, IPPROTO_IP, IP_MULTICAST_LOOP, &loop, sizeof(loop)) < 0) {
        perror("mvh-mcast: multicast socket options");
        return 1;
    }
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr = group};
    long sent = 0;
    for (long i = 0; i < n; i++) {
        char msg[32];
        int len = snprintf(msg, sizeof(msg), "mvh-mcast %ld", i);
        if (sendto(fd, msg, (size_t)len, 0, (struct sockaddr *)&to, sizeof(to)) < 0) {
            perror("mvh-mcast: sendto");
            break;
        }
        sent++;
    }
    printf("sent=%ld\n", sent);
    close(fd);
    return sent == n ? 0 : 1;
}

/* Raises net.ipv4.igmp_max_memberships to at least `want` (a per-socket limit, default 20). */
static void raise_membership_limit(long want)
{
    const char *path = "/proc/sys/net/ipv4/igmp_max_memberships";
    FILE *f = fopen(path, "r");
    long cur = 0;
    if (f) {
        if (fscanf(f, "%ld", &cur) != 1)
            cur = 0;
        fclose(f);
    }
    if (cur >= want)
        return;
    f = fopen(path, "w");
    if (!f || fprintf(f, "%ld\n", want) < 0 || fclose(f) != 0)
        fprintf(stderr, "mvh-mcast: cannot raise %s to %ld: %s\n", path, want, strerror(errno));
}

static int cmd_join_many(char **argv)
{
    unsigned ifindex = ifindex_of(argv[0]);
    struct in_addr first = group_of(argv[1]);
    long n = number(argv[2], 1, 100000);
    double secs = seconds(argv[3]);
    uint32_t base = ntohl(first.s_addr);
    if ((uint64_t)base + (uint64_t)n - 1 > 0xefffffffu) {
        fprintf(stderr, "mvh-mcast: %s + %ld leaves 224.0.0.0/4\n", argv[1], n);
        return 2;
    }
    raise_membership_limit(n);
    /* A socket's memberships also count against net.core.optmem_max (a few hundred on a
     * 6.1 kernel): when one is full (ENOBUFS), the next group goes on a new socket. */
    int *fds = calloc((size_t)n, sizeof(int));
    int *owner = calloc((size_t)n, sizeof(int));
    if (!fds || !owner) {
        perror("mvh-mcast: calloc");
        return 1;
    }
    int nfds = 0;
    fds[nfds++] = udp_socket();
    long joined = 0;
    int first_err = 0;
    for (long i = 0; i < n; i++) {
        struct in_addr g = {.s_addr = htonl(base + (uint32_t)i)};
        owner[i] = -1;
        int r = membership(fds[nfds - 1], IP_ADD_MEMBERSHIP, g, ifindex);
        if (r < 0 && errno == ENOBUFS) {
            fds[nfds++] = udp_socket();
            r = membership(fds[nfds - 1], IP_ADD_MEMBERSHIP, g, ifindex);
        }
        if (r == 0) {
            owner[i] = nfds - 1;
            joined++;
        } else if (!first_err) {
            first_err = errno;
        }
    }
    printf("joined=%ld sockets=%d\n", joined, nfds);
    if (first_err)
        printf("error=%s\n", strerror(first_err));
    fflush(stdout);
    install_signals();
    double end = now() + secs;
    while (!stop_requested) {
        double left = end - now();
        if (left <= 0)
            break;
        poll(NULL, 0, (int)(left * 1000) + 1);
    }
    long dropped = 0;
    for (long i = 0; i < n; i++) {
        struct in_addr g = {.s_addr = htonl(base + (uint32_t)i)};
        if (owner[i] >= 0 && membership(fds[owner[i]], IP_DROP_MEMBERSHIP, g, ifindex) == 0)
            dropped++;
    }
    printf("left=%ld\n", dropped);
    for (int i = 0; i < nfds; i++)
        close(fds[i]);
    free(fds);
    free(owner);
    return joined == n && dropped == n ? 0 : 1;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc != 6)
        usage();
    if (strcmp(argv[1], "recv") == 0)
        return cmd_recv(argv + 2);
    if (strcmp(argv[1], "send") == 0)
        return cmd_send(argv + 2);
    if (strcmp(argv[1], "join-many") == 0)
        return cmd_join_many(argv + 2);
    usage();
    return 2;
}
