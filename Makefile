# cryptfuse developer entry points.  `make demo` and `make test` each do their own set-up:
# Debian packages when missing, a virtualenv in .venv, and `pip install -e .[test]`.

SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# fuse2fs/dosfstools/xfsprogs: --mount-fs as an ordinary user (fuse2fs), with vfat or
# xfs (tests: whichever the kernel has).
# fuse3/libfuse3-dev/pkg-config/gcc/python3-dev build and run pyfuse3; the rest is what the
# demo and the end-to-end tests drive (cryptsetup, qemu-img, mkfs.ext4, losetup, xz);
# libasan8/libubsan1/libtsan2 are gcc 12's sanitizer runtimes (make test-sanitize, test-tsan;
# gcc-12 already depends on them); fio is the external oracle of make test-fio/test-load.
DEB_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3 python3-dev python3-venv \
	libssl-dev libgcrypt20-dev nettle-dev cryptsetup-bin qemu-utils qemu-system-common e2fsprogs \
	xz-utils util-linux mount libasan8 libubsan1 libtsan2 fuse2fs dosfstools xfsprogs fio

.PHONY: setup debs test test-foreign test-sanitize test-tsan test-fio test-load demo lint bench clean distclean

setup: $(STAMP)

# Installs only what is missing, so on a prepared machine this never touches apt.
debs:
	@if ! command -v dpkg-query >/dev/null || ! command -v apt-get >/dev/null; then \
		echo "setup: no dpkg/apt-get here; install by hand: $(DEB_PACKAGES)"; exit 0; \
	fi; \
	missing=""; \
	for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' "$$p" 2>/dev/null | grep -q '^install ok installed$$' \
			|| missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then echo "setup: Debian packages present"; exit 0; fi; \
	sudo=""; \
	if [ "$$(id -u)" != 0 ]; then \
		if command -v sudo >/dev/null; then sudo="sudo"; \
		else echo "setup: not root and no sudo; install by hand:$$missing" >&2; exit 0; fi; \
	fi; \
	echo "setup: installing$$missing"; \
	$$sudo apt-get update -q && \
	DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q --no-install-recommends $$missing

# Reinstalled when the package metadata or the C accelerator changes; the Debian
# packages are checked on every run (cheap).
$(STAMP): setup.cfg pyproject.toml $(wildcard setup.py cryptfuse/*.c) | debs
	@test -x $(VPY) || { echo "setup: creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	$(VPY) -m pip install -q -e '.[test]'
	@touch $@

test: setup
	$(VPY) -m pytest -q tests

# Every TrueCrypt/VeraCrypt, BitLocker and FileVault 2 image of the corpus (slow KDFs;
# `make test` runs a subset).  See docs/foreign.md.
test-foreign: setup
	CRYPTFUSE_FOREIGN_FULL=1 $(VPY) -m pytest -q tests/test_foreign.py

# The C extensions built again with sanitizers into build/sanitize/ (the venv's build is
# untouched) and the tests run against them; any sanitizer report fails the target.
# See docs/sanitizers.md.  ASan+UBSan: the whole suite except the crash tests that kill
# a forked Python child at every write (pure Python, a third of the time under ASan).
SANITIZE_TESTS ?= tests -k "not at_every_write"
test-sanitize: setup
	tests/sanitize/run asan $(VPY) -q $(SANITIZE_TESTS)

# ThreadSanitizer: the tests that run the C data path from several threads.
TSAN_TESTS ?= tests/test_fastpath.py tests/test_channel.py tests/test_stress.py \
	tests/test_reencrypt_online.py::test_online_key_change_served_in_c \
	tests/test_e2e_mount.py tests/test_volume_lifecycle.py tests/test_faults.py
test-tsan: setup
	tests/sanitize/run tsan $(VPY) -q $(TSAN_TESTS)

# fio's own verification through a mounted volume (~20 s), and 64 fio processes writing
# and reading one volume for 30 s (daemon RSS, request latency, nothing lost; ~45 s).
# See docs/reliability.md.
test-fio: setup
	CRYPTFUSE_FIO=1 $(VPY) -m pytest -q tests/test_fio.py

test-load: setup
	CRYPTFUSE_LOAD=1 $(VPY) -m pytest -q -s tests/test_load.py

# Kill campaigns (docs/reliability.md): the daemon SIGKILLed KILL_ITERATIONS times under
# ext4 workloads, then format/add-key/change-key/convert SIGKILLed four times each.
KILL_ITERATIONS ?= 50
.PHONY: test-kill
test-kill: setup
	KILL_ITERATIONS=$(KILL_ITERATIONS) KILL_COMMAND_ROUNDS=4 $(VPY) -m pytest -q -s \
		tests/test_kill_campaign.py tests/test_kill_commands.py

# Coverage-guided fuzzing with atheris, FUZZ_SECONDS per target (docs/reliability.md).
# A crash fails the target; its input is in build/fuzz/TARGET-crash-*: add it to
# tests/fuzz_regressions/TARGET/ and fix the bug.
FUZZ_SECONDS ?= 22
# A fixed seed by default: the same mutations in the same order on every run, so CI
# tells a new bug from an unlucky draw (FUZZ_SEED=0: a fresh seed each run, for digging).
FUZZ_SEED ?= 1
FUZZ_TARGETS ?= luks1 luks2 luks2_json cipher_spec plain channel
.PHONY: fuzz
fuzz: setup
	@mkdir -p build/fuzz
	@for t in $(FUZZ_TARGETS); do \
		echo "== fuzz $$t ($(FUZZ_SECONDS) s)"; \
		if ! $(VPY) tests/fuzz_run.py $$t --seconds $(FUZZ_SECONDS) --seed $(FUZZ_SEED) >build/fuzz/$$t.log 2>&1; then \
			tail -n 60 build/fuzz/$$t.log; exit 1; \
		fi; \
		grep -E '^(Done|stat::new_units_added)' build/fuzz/$$t.log; \
	done

demo: setup
	examples/demo.sh

# mount(8) runs mount.fuse3, which runs `cryptfuse` with a fixed PATH
# (/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin): a virtualenv's cryptfuse
# is found only through a link there.  Also the man page and the bash completion.
PREFIX ?= /usr/local
.PHONY: install uninstall man
install: setup
	install -d $(DESTDIR)$(PREFIX)/sbin $(DESTDIR)$(PREFIX)/share/man/man8 \
		$(DESTDIR)$(PREFIX)/share/bash-completion/completions
	ln -sfn $(abspath $(VENV))/bin/cryptfuse $(DESTDIR)$(PREFIX)/sbin/cryptfuse
	install -m 0644 man/cryptfuse.8 $(DESTDIR)$(PREFIX)/share/man/man8/cryptfuse.8
	install -m 0644 completion/cryptfuse $(DESTDIR)$(PREFIX)/share/bash-completion/completions/cryptfuse

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/sbin/cryptfuse $(DESTDIR)$(PREFIX)/share/man/man8/cryptfuse.8 \
		$(DESTDIR)$(PREFIX)/share/bash-completion/completions/cryptfuse

# man/cryptfuse.8 is generated from the parser behind --help (argparse-manpage, a test
# extra) plus man/cryptfuse.8.include; tests/test_manpage.py fails when it is stale.
man: setup
	$(VPY) man/generate.py > man/cryptfuse.8.tmp && mv man/cryptfuse.8.tmp man/cryptfuse.8

lint: setup
	$(VENV)/bin/ruff check cryptfuse tests examples bench cryptfuse.py
	$(VENV)/bin/mypy

# Needs root (loop devices, drop_caches); BENCH_ARGS=--quick for a short run.
bench: setup
	$(VPY) bench/run.py $(BENCH_ARGS)

# cryptfuse reencrypt vs cryptsetup reencrypt, 1 GiB, 3 rounds (root drops the page cache).
.PHONY: bench-reencrypt
bench-reencrypt: setup
	$(VPY) bench/reencrypt.py $(BENCH_REENCRYPT_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf

# Also the venv and the in-place build of the C accelerator (pip install -e makes it).
distclean: clean
	rm -rf $(VENV) cryptfuse/*.so
