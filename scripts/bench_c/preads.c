/*
 * preads FILE < OFFSETS: one 4 KiB pread(2) at each offset read from stdin (decimal, one per
 * line), timed as a whole; prints "SECONDS SHORT" then "ERRNO COUNT" per failing errno.
 *
 * The refusal benchmark's client: a Python client pays for an OSError per failed read (about
 * what the daemon spends on a refusal), which would be charged to the server.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	static char buf[4096];
	static long errors[4096];
	size_t n = 0, cap = 1024;
	unsigned long long *offs = malloc(cap * sizeof(*offs));
	struct timespec a, b;
	long shortreads = 0;
	int fd;

	if (argc != 2) {
		fprintf(stderr, "usage: preads FILE < OFFSETS\n");
		return 2;
	}
	while (offs && scanf("%llu", &offs[n]) == 1)
		if (++n == cap)
			offs = realloc(offs, (cap *= 2) * sizeof(*offs));
	fd = open(argv[1], O_RDONLY);
	if (!offs || fd < 0) {
		perror(argv[1]);
		return 1;
	}
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (size_t i = 0; i < n; i++) {
		ssize_t got = pread(fd, buf, sizeof(buf), (off_t)offs[i]);
		if (got < 0)
			errors[errno < 4096 ? errno : 0]++;
		else if (got != sizeof(buf))
			shortreads++;
	}
	clock_gettime(CLOCK_MONOTONIC, &b);
	printf("%.9f %ld\n", (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) / 1e9, shortreads);
	for (int e = 0; e < 4096; e++)
		if (errors[e])
			printf("%d %ld\n", e, errors[e]);
	return 0;
}
