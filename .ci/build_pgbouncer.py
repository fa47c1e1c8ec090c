"""Build PgBouncer 1.24.1 for the course into ``.pgcourse/pgbouncer`` (a maintainer's script).

``python -m helpers pgbouncer install`` runs :func:`install`: it downloads Debian 13's source
package from deb.debian.org (the upstream tarball plus Debian's security patches; both checked
against the SHA-256 sums below, cached in ``.pgcourse/pgbouncer/downloads``), then
``configure && make && make install`` (about 15 s). CI runs it; learners use a packaged
PgBouncer (``apt-get install pgbouncer``, ``brew install pgbouncer``) or this.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

from helpers._infra.errors import CourseError
from helpers._infra.locks import file_lock
from helpers._infra.pgbouncer import (
    BUILD_PACKAGES,
    SOURCE_VERSION,
    Binary,
    PgBouncerMissing,
    binary_version,
    build_dir,
)

DEBIAN_MIRROR = "http://deb.debian.org/debian/pool/main/p/pgbouncer"
SOURCE_FILES = {
    "pgbouncer_1.24.1.orig.tar.gz":
        "da72a3aba13072876d055a3e58dd4aba4a5de4ed6148e73033185245598fd3e0",
    "pgbouncer_1.24.1-1+deb13u2.debian.tar.xz":
        "2325bcaa2e71919d399b9e5aef5b94ff988fc1f1d296908c3937b682b7be5cbb",
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(name: str, folder: Path, say) -> Path | None:
    """``name`` from the cache folder or Debian's mirror, verified; None if unavailable."""
    path = folder / name
    if path.exists() and _sha256(path) == SOURCE_FILES[name]:
        return path
    url = f"{DEBIAN_MIRROR}/{quote(name)}"
    tmp = path.with_suffix(path.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        say(f"  could not download {url}: {getattr(exc, 'reason', exc)}")
        return None
    if _sha256(tmp) != SOURCE_FILES[name]:
        tmp.unlink(missing_ok=True)
        raise CourseError(f"{url} does not have the expected SHA-256; refusing to build it.",
                          f"Put a verified copy of {name} into {folder} and run install again.")
    tmp.rename(path)
    return path


def _missing_build_tools(patches: bool) -> list[str]:
    missing = [tool for tool in ("make", "pkg-config") if not shutil.which(tool)]
    if not (shutil.which("cc") or shutil.which("gcc")):
        missing.append("a C compiler (gcc)")
    if patches and not shutil.which("patch"):
        missing.append("patch")
    if shutil.which("pkg-config"):
        for lib, pkg in (("libevent", "libevent-dev"), ("openssl", "libssl-dev")):
            ok = subprocess.run(["pkg-config", "--exists", lib], capture_output=True).returncode
            if ok != 0:
                missing.append(pkg)
    return missing


def install(force: bool = False, say=print) -> Binary:
    """Build PgBouncer :data:`SOURCE_VERSION` into ``.pgcourse/pgbouncer`` and return it.

    Downloads Debian 13's source package from deb.debian.org (upstream tarball plus Debian's
    security patches; both checked against pinned SHA-256 sums, cached in
    ``.pgcourse/pgbouncer/downloads``), then ``configure && make && make install``. Needs
    ``apt-get install gcc make pkg-config libevent-dev libssl-dev patch``. Reuses an existing
    build of the same version unless ``force``.
    """
    home = build_dir()
    target = home / "bin" / "pgbouncer"
    with file_lock(home / "install.lock"):  # a second install waits for the first
        if target.exists() and not force:
            with contextlib.suppress(PgBouncerMissing):
                version = binary_version(target)
                if ".".join(map(str, version)) == SOURCE_VERSION:
                    say(f"PgBouncer {SOURCE_VERSION} is already built (use --force to rebuild)")
                    return Binary(target, "course build", version)
        t0 = time.perf_counter()
        downloads = home / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        orig_name, debian_name = list(SOURCE_FILES)
        orig = _download(orig_name, downloads, say)
        if orig is None:
            raise CourseError(f"Could not download the PgBouncer {SOURCE_VERSION} source.",
                              f"Copy {orig_name} (from {DEBIAN_MIRROR}/) into {downloads}, or "
                              "install pgbouncer with your package manager.")
        debian = _download(debian_name, downloads, say)
        missing = _missing_build_tools(patches=debian is not None)
        if missing:
            raise CourseError("Building PgBouncer needs: " + ", ".join(missing) + ".",
                              f"Debian/Ubuntu: `sudo apt-get install -y {BUILD_PACKAGES}`; "
                              "or install a pgbouncer package instead.")
        work = home / f"build-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            with tarfile.open(orig) as tar:
                _extract(tar, work)
            src = work / f"pgbouncer-{SOURCE_VERSION}"
            if debian is not None:
                with tarfile.open(debian) as tar:
                    _extract(tar, src)
                series = (src / "debian" / "patches" / "series").read_text().split()
                for patch in series:
                    if patch == "debian-config":  # only Debian's paths in the sample config
                        continue
                    _step(["patch", "-p1", "-s", "-i", f"debian/patches/{patch}"], src,
                          f"applying {patch}")
                say(f"  applied Debian's {len(series) - 1} security patches")
            else:
                say("  building the upstream source without Debian's patches")
            prefix = home.resolve()
            _step(["./configure", f"--prefix={prefix}", "--without-cares",
                   "--without-systemd", "--without-pam"], src, "configure")
            jobs = str(max(1, os.cpu_count() or 1))
            _step(["make", f"-j{jobs}"], src, "make")
            _step(["make", "install"], src, "make install")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        binary = Binary(target, "course build", binary_version(target))
        say(f"built {binary.describe()} in {time.perf_counter() - t0:.1f} s")
        return binary


def _extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Unpack a source tarball, refusing paths that would land outside ``dest``."""
    if hasattr(tarfile, "data_filter"):  # Python 3.11.4+ (Debian 12's 3.11.2 lacks it)
        tar.extractall(dest, filter="data")
        return
    root = dest.resolve()
    for member in tar.getmembers():
        target = (dest / member.name).resolve()
        if not (member.isfile() or member.isdir() or member.issym()) or (
                root not in target.parents and target != root):
            raise CourseError(f"Refusing to unpack {member.name!r} from {tar.name}.")
        if member.issym() and root not in (target.parent / member.linkname).resolve().parents:
            raise CourseError(f"Refusing the link {member.name!r} in {tar.name}.")
    tar.extractall(dest)


def _step(cmd: list[str], cwd: Path, what: str) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        raise CourseError(f"Building PgBouncer failed at {what}: {tail}",
                          f"Build dependencies: `apt-get install -y {BUILD_PACKAGES}`.")
