/* forward: serve 127.0.0.1:PORT inside a sandbox and relay each connection to the egress
 * proxy's unix socket, for as long as PROGRAM runs.
 *
 *   forward PORT SOCKET PROGRAM [ARGS...]
 *
 * A sandbox in network mode "model" has loopback only; the server's proxy listens on a unix
 * socket whose directory is mounted into the sandbox. Agent CLIs speak TCP, so this serves
 * the port. It is a wrapper that keeps the caller's pid: a forked child serves the port and
 * the original process execs PROGRAM, so PROGRAM gets signals, stdio, env and cwd untouched,
 * and the child dies with it (PR_SET_PDEATHSIG). If the port cannot be served, PROGRAM still
 * runs (one line on stderr says why): the agent then fails on its own model calls, visibly.
 *
 * Static and dependency-free (cc -static -Os -s): sandbox images may be busybox or Debian. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define BIND_RETRY_MS 2000 /* a previous turn's forwarder may still hold the port while it dies */
#define BIND_STEP_MS 50
#define BUF_SIZE 65536

static const char *sock_path;

/* Die with our parent; then check it is still there, as it may have exited before prctl. */
static void die_with_parent(pid_t parent) {
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent) _exit(0);
}

/* -1 with errno set, or a listening socket. EADDRINUSE is retried for BIND_RETRY_MS. */
static int listen_on(int port) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    if (fd < 0) return -1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct timespec step = {0, BIND_STEP_MS * 1000000L};
    for (int waited = 0; bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0; waited += BIND_STEP_MS) {
        if (errno != EADDRINUSE || waited >= BIND_RETRY_MS) goto fail;
        nanosleep(&step, NULL);
    }
    if (listen(fd, 128) == 0) return fd;
fail:;
    int saved = errno;
    close(fd);
    errno = saved;
    return -1;
}

/* One direction of a connection: bytes read from `from`, not yet all written to `to`. */
struct half {
    int from, to, eof;
    size_t len, off;
    char buf[BUF_SIZE];
};

/* Relay both directions until both reached EOF and were flushed, or an error ends it. Non-blocking
 * sockets and a buffer per direction: a slow side never stalls the other direction. */
static void relay(int tcp, int unx) {
    static struct half h[2];
    h[0] = (struct half){.from = tcp, .to = unx};
    h[1] = (struct half){.from = unx, .to = tcp};
    fcntl(tcp, F_SETFL, O_NONBLOCK);
    fcntl(unx, F_SETFL, O_NONBLOCK);
    for (;;) {
        struct pollfd p[2];
        for (int i = 0; i < 2; i++) {
            /* Read only into an empty buffer; write while it holds bytes; -1 means not watched. */
            p[i].fd = h[i].len ? h[i].to : h[i].eof ? -1 : h[i].from;
            p[i].events = h[i].len ? POLLOUT : POLLIN;
        }
        if (p[0].fd < 0 && p[1].fd < 0) return;
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR) continue;
            return;
        }
        for (int i = 0; i < 2; i++) {
            struct half *d = &h[i];
            if (p[i].fd < 0 || !p[i].revents) continue;
            ssize_t n;
            if (d->len) {
                n = write(d->to, d->buf + d->off, d->len - d->off);
                if (n > 0 && (d->off += (size_t)n) == d->len) d->len = d->off = 0;
            } else {
                n = read(d->from, d->buf, sizeof d->buf);
                if (n > 0) d->len = (size_t)n;
                if (n == 0) { /* half-close: pass the EOF on, keep the other direction going */
                    d->eof = 1;
                    shutdown(d->to, SHUT_WR);
                }
            }
            if (n < 0 && errno != EAGAIN && errno != EINTR) return; /* reset or gone: drop both */
        }
    }
}

/* The proxy is not there: say so as an HTTP answer, so the agent's error names the cause. */
static void refuse(int tcp, int err) {
    char body[256], msg[512];
    int blen = snprintf(body, sizeof body, "forward: the egress proxy at %s is not reachable: %s\n", sock_path,
                        strerror(err));
    int mlen = snprintf(msg, sizeof msg,
                        "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                        "Connection: close\r\n\r\n%s", blen, body);
    if (write(tcp, msg, (size_t)mlen) < 0) return;
    /* Read the request away until the client closes (bounded): closing with unread bytes would
     * send a reset that can destroy the answer before the client reads it. */
    struct timeval limit = {1, 0};
    setsockopt(tcp, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
    shutdown(tcp, SHUT_WR);
    while (read(tcp, msg, sizeof msg) > 0) {}
}

static void serve_connection(int tcp) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strcpy(addr.sun_path, sock_path); /* length checked in main */
    int unx = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (unx < 0 || connect(unx, (struct sockaddr *)&addr, sizeof addr) != 0)
        refuse(tcp, errno);
    else
        relay(tcp, unx);
}

/* The forwarder process: accept forever, one child per connection (each dies with us). */
static void serve(int lfd, int ready) {
    pid_t self = getpid();
    signal(SIGPIPE, SIG_IGN); /* a vanished peer is an EPIPE on write, not our death */
    signal(SIGCHLD, SIG_IGN); /* connection children are reaped by the kernel */
    int devnull = open("/dev/null", O_RDWR);
    /* Keep stderr (the program's) for our own errors; PROGRAM's stdin/stdout are not ours. */
    if (devnull >= 0) {
        dup2(devnull, 0);
        dup2(devnull, 1);
        if (devnull > 2) close(devnull);
    }
    if (write(ready, "", 1) < 0) _exit(1);
    close(ready);
    for (;;) {
        int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) { /* keep serving; out of fds (EMFILE...): wait a little rather than spin */
            if (errno != EINTR && errno != ECONNABORTED) nanosleep(&(struct timespec){0, 50000000L}, NULL);
            continue;
        }
        pid_t pid = fork();
        if (pid == 0) {
            die_with_parent(self);
            close(lfd);
            serve_connection(c);
            _exit(0);
        }
        close(c);
    }
}

int main(int argc, char **argv) {
    char *end;
    long port = argc > 1 ? strtol(argv[1], &end, 10) : 0;
    if (argc < 4 || argv[1][0] < '0' || argv[1][0] > '9' || *end || port < 1 || port > 65535 ||
        strlen(argv[2]) >= sizeof((struct sockaddr_un){0}.sun_path)) {
        fprintf(stderr, "usage: forward PORT SOCKET PROGRAM [ARGS...]\n"
                        "  serves 127.0.0.1:PORT (1-65535), relaying to the unix socket SOCKET (shorter\n"
                        "  than 108 bytes), while PROGRAM runs with this process's pid\n");
        return 2;
    }
    sock_path = argv[2];
    int lfd = listen_on((int)port), ready[2] = {-1, -1};
    if (lfd < 0)
        fprintf(stderr, "forward: cannot serve 127.0.0.1:%ld: %s; running %s without the egress forwarder\n",
                port, strerror(errno), argv[3]);
    else if (pipe2(ready, O_CLOEXEC) != 0) {
        fprintf(stderr, "forward: pipe: %s; running %s without the egress forwarder\n", strerror(errno), argv[3]);
        close(lfd);
    } else {
        pid_t parent = getpid(), pid = fork();
        if (pid == 0) {
            die_with_parent(parent);
            close(ready[0]);
            serve(lfd, ready[1]);
        }
        if (pid < 0)
            fprintf(stderr, "forward: fork: %s; running %s without the egress forwarder\n", strerror(errno), argv[3]);
        /* Wait until the child is set to die with us (or is gone: EOF), then leave it the socket. */
        char byte;
        close(ready[1]);
        while (pid > 0 && read(ready[0], &byte, 1) < 0 && errno == EINTR) {}
        close(ready[0]);
        close(lfd);
    }
    execvp(argv[3], argv + 3);
    int err = errno;
    fprintf(stderr, "forward: %s: %s\n", argv[3], strerror(err));
    return err == EACCES ? 126 : 127;
}
