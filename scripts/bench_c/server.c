/*
 * Reference for scripts/bench: the least a C FUSE low-level server can do.
 *
 * One file, "mem", served from an anonymous mmap of SIZE bytes, multi-threaded
 * (fuse_session_loop_mt), in FUSE direct_io mode or, with --page-cache, through
 * the page cache (what MAP_SHARED mappings need). Built by scripts/bench.py at
 * run time with gcc and `pkg-config fuse3`; runs in the foreground until
 * unmounted or signalled.
 *
 * usage: server MOUNTPOINT SIZE_BYTES [--page-cache]
 */
#define FUSE_USE_VERSION 314
#define _GNU_SOURCE

#include <errno.h>
#include <fuse_lowlevel.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

#define FILE_INO 2
static const char FILE_NAME[] = "mem";

static char *data;
static size_t data_size;
static int page_cache;

static void fill_attr(fuse_ino_t ino, struct stat *st)
{
	memset(st, 0, sizeof(*st));
	st->st_ino = ino;
	if (ino == FUSE_ROOT_ID) {
		st->st_mode = S_IFDIR | 0755;
		st->st_nlink = 2;
	} else {
		st->st_mode = S_IFREG | 0600;
		st->st_nlink = 1;
		st->st_size = (off_t)data_size;
		st->st_blksize = 4096;
	}
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct fuse_entry_param e;

	if (parent != FUSE_ROOT_ID || strcmp(name, FILE_NAME) != 0) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	memset(&e, 0, sizeof(e));
	e.ino = FILE_INO;
	e.attr_timeout = e.entry_timeout = 3600.0;
	fill_attr(FILE_INO, &e.attr);
	fuse_reply_entry(req, &e);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct stat st;

	(void)fi;
	if (ino != FUSE_ROOT_ID && ino != FILE_INO) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	fill_attr(ino, &st);
	fuse_reply_attr(req, &st, 3600.0);
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
		       struct fuse_file_info *fi)
{
	(void)attr;
	(void)to_set;
	op_getattr(req, ino, fi); /* the size never changes (O_TRUNC is a no-op) */
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	if (ino != FILE_INO) {
		fuse_reply_err(req, EISDIR);
		return;
	}
	fi->direct_io = !page_cache;
	fi->keep_cache = 0; /* each open starts with an empty page cache, as memfs's do */
	fuse_reply_open(req, fi);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	(void)ino;
	(void)fi;
	if (off < 0 || (size_t)off >= data_size)
		size = 0;
	else if (size > data_size - (size_t)off)
		size = data_size - (size_t)off;
	fuse_reply_buf(req, size ? data + off : NULL, size);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
		     struct fuse_file_info *fi)
{
	(void)ino;
	(void)fi;
	if (off < 0 || (size_t)off >= data_size) {
		fuse_reply_err(req, ENOSPC);
		return;
	}
	if (size > data_size - (size_t)off)
		size = data_size - (size_t)off;
	memcpy(data + off, buf, size);
	fuse_reply_write(req, size);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		       struct fuse_file_info *fi)
{
	static const char *names[] = {".", "..", FILE_NAME};
	static const fuse_ino_t inos[] = {FUSE_ROOT_ID, FUSE_ROOT_ID, FILE_INO};
	char buf[512];
	size_t used = 0;

	(void)fi;
	if (ino != FUSE_ROOT_ID) {
		fuse_reply_err(req, ENOTDIR);
		return;
	}
	for (off_t i = off; i < 3; i++) {
		struct stat st;
		size_t len;

		fill_attr(inos[i], &st);
		len = fuse_add_direntry(req, buf + used, sizeof(buf) - used, names[i], &st, i + 1);
		if (used + len > size || used + len > sizeof(buf))
			break;
		used += len;
	}
	fuse_reply_buf(req, buf, used);
}

static const struct fuse_lowlevel_ops ops = {
	.lookup = op_lookup,
	.getattr = op_getattr,
	.setattr = op_setattr,
	.open = op_open,
	.read = op_read,
	.write = op_write,
	.readdir = op_readdir,
};

int main(int argc, char **argv)
{
	struct fuse_args args = FUSE_ARGS_INIT(0, NULL);
	struct fuse_loop_config *config;
	struct fuse_session *se;
	char *end;
	int ret = 1;

	if (argc < 3 || argc > 4 || (argc == 4 && strcmp(argv[3], "--page-cache") != 0)) {
		fprintf(stderr, "usage: %s MOUNTPOINT SIZE_BYTES [--page-cache]\n", argv[0]);
		return 2;
	}
	data_size = strtoull(argv[2], &end, 0);
	if (*end || data_size == 0) {
		fprintf(stderr, "%s: bad size %s\n", argv[0], argv[2]);
		return 2;
	}
	page_cache = argc == 4;
	data = mmap(NULL, data_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (data == MAP_FAILED) {
		perror("mmap");
		return 1;
	}

	if (fuse_opt_add_arg(&args, argv[0]) || fuse_opt_add_arg(&args, "-o") ||
	    fuse_opt_add_arg(&args, page_cache ? "fsname=memfs-bench-c,subtype=pagecache,default_permissions"
					       : "fsname=memfs-bench-c,subtype=directio,default_permissions"))
		return 1;
	se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
	if (!se)
		goto out_args;
	if (fuse_set_signal_handlers(se))
		goto out_session;
	if (fuse_session_mount(se, argv[1]))
		goto out_signals;
	config = fuse_loop_cfg_create();
	fuse_loop_cfg_set_clone_fd(config, 0);
	fuse_loop_cfg_set_idle_threads(config, 10);
	ret = fuse_session_loop_mt(se, config) ? 1 : 0;
	fuse_loop_cfg_destroy(config);
	fuse_session_unmount(se);
out_signals:
	fuse_remove_signal_handlers(se);
out_session:
	fuse_session_destroy(se);
out_args:
	fuse_opt_free_args(&args);
	munmap(data, data_size);
	return ret;
}
