"""Find or provision a working ``consul`` binary, printing its path.

Why: the tests and the dev stack run a real Consul agent, and machines differ in what they
have. We try the cheapest source first and stop at the first binary that answers
``consul version``:

1. ``$CONSUL_BIN`` (an explicit choice: if it is broken we fail rather than pick another);
2. ``consul`` on ``PATH``;
3. ``<project>/.tools/bin/consul``, left by an earlier run;
4. HashiCorp's release zip, checked against its SHA256SUMS file;
5. Debian bullseye's ``consul`` package, fetched with apt into private directories (bookworm
   has no consul package; bullseye has 1.8.7). The archive URI comes from this machine's own
   apt sources, so a mirror configured there is used.

Stdlib only, so it runs before any dependency is installed::

    python scripts/get_consul.py        # path on stdout, progress on stderr
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TOOLS_DIR = PROJECT_ROOT / ".tools"
LOCAL_CONSUL = TOOLS_DIR / "bin" / "consul"

HASHICORP_VERSION = "1.20.5"
HASHICORP_BASE_URL = "https://releases.hashicorp.com/consul"
CONNECT_TIMEOUT_S = 10.0

DEBIAN_SUITE = "bullseye"
APT_SOURCES = Path("/etc/apt/sources.list")
APT_SOURCE_PARTS = Path("/etc/apt/sources.list.d")
# Suites of Debian's main archive (not -security, -updates or third-party "nodistro" ones).
DEBIAN_BASE_SUITES = frozenset(
    "buster bullseye bookworm trixie forky duke sid "
    "oldoldstable oldstable stable testing unstable".split()
)


class ConsulNotFound(RuntimeError):
    """No source gave a consul binary that runs."""


class SourceFailed(Exception):
    """One source could not provide consul; the message says why."""


def log(message: str) -> None:
    print(f"get_consul: {message}", file=sys.stderr, flush=True)


def consul_version(binary: Path) -> str | None:
    """First line of ``consul version`` (``Consul v1.8.7``), or None if it does not run."""
    try:
        done = subprocess.run(
            [str(binary), "version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    first_line = done.stdout.partition("\n")[0].strip()
    return first_line if done.returncode == 0 and first_line.startswith("Consul v") else None


def install(binary: Path) -> Path:
    """Copy a checked binary to ``.tools/bin/consul`` atomically."""
    LOCAL_CONSUL.parent.mkdir(parents=True, exist_ok=True)
    staged = LOCAL_CONSUL.with_name(f".consul.{os.getpid()}")
    shutil.copyfile(binary, staged)
    staged.chmod(0o755)
    os.replace(staged, LOCAL_CONSUL)
    return LOCAL_CONSUL


# -- sources: each returns a candidate path, None when it does not apply, or raises SourceFailed


def from_env() -> Path | None:
    value = os.environ.get("CONSUL_BIN")
    return Path(value) if value else None


def from_path() -> Path | None:
    found = shutil.which("consul")
    return Path(found) if found else None


def from_project_tools() -> Path | None:
    return LOCAL_CONSUL if LOCAL_CONSUL.is_file() else None


def hashicorp_platform() -> str:
    system = platform.system().lower()
    machine = platform.machine().lower()
    arch = {
        "x86_64": "amd64",
        "amd64": "amd64",
        "aarch64": "arm64",
        "arm64": "arm64",
        "i386": "386",
        "i686": "386",
        "armv7l": "arm",
    }.get(machine)
    if arch is None:
        raise SourceFailed(f"no HashiCorp build for machine {machine!r}")
    return f"{system}_{arch}"


def fetch(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=CONNECT_TIMEOUT_S) as response:
            data: bytes = response.read()
            return data
    except OSError as exc:
        raise SourceFailed(f"{url}: {exc}") from exc


def from_hashicorp() -> Path:
    version = HASHICORP_VERSION
    zip_name = f"consul_{version}_{hashicorp_platform()}.zip"
    sums = fetch(f"{HASHICORP_BASE_URL}/{version}/consul_{version}_SHA256SUMS").decode()
    expected = next(
        (line.split()[0] for line in sums.splitlines() if line.endswith(f" {zip_name}")), None
    )
    if expected is None:
        raise SourceFailed(f"{zip_name} is not listed in the SHA256SUMS file")
    archive = fetch(f"{HASHICORP_BASE_URL}/{version}/{zip_name}")
    if hashlib.sha256(archive).hexdigest() != expected:
        raise SourceFailed(f"{zip_name}: SHA256 does not match the SHA256SUMS file")
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(io.BytesIO(archive)) as zipped:
        binary = Path(zipped.extract("consul", tmp))
        binary.chmod(0o755)
        return checked_install(binary)


@dataclass(frozen=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]
    signed_by: str | None


def parse_one_line_sources(text: str) -> Iterator[AptSource]:
    """``deb [signed-by=/k.gpg] http://mirror/debian bookworm main`` lines."""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        rest = line[4:].strip()
        options: dict[str, str] = {}
        if rest.startswith("["):
            option_text, _, rest = rest[1:].partition("]")
            options = {k: v for k, _, v in (opt.partition("=") for opt in option_text.split())}
        words = rest.split()
        if len(words) >= 2:
            yield AptSource(words[0], (words[1],), options.get("signed-by"))


def parse_deb822_sources(text: str) -> Iterator[AptSource]:
    """Stanzas of a ``*.sources`` file (Types:, URIs:, Suites:, Signed-By:, Enabled:)."""
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and key:
                fields[key] += "\n" + line.strip()
            else:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        signed_by = fields.get("signed-by")
        keyring = signed_by if signed_by and "\n" not in signed_by else None
        for uri in fields.get("uris", "").split():
            yield AptSource(uri, tuple(fields.get("suites", "").split()), keyring)


def machine_apt_sources() -> Iterator[AptSource]:
    files = [APT_SOURCES, *sorted(APT_SOURCE_PARTS.glob("*.list"))]
    for path in files:
        if path.is_file():
            yield from parse_one_line_sources(path.read_text(errors="replace"))
    for path in sorted(APT_SOURCE_PARTS.glob("*.sources")):
        yield from parse_deb822_sources(path.read_text(errors="replace"))


def debian_archive() -> AptSource:
    """The machine's Debian main archive: the first source carrying a plain Debian suite."""
    for source in machine_apt_sources():
        if DEBIAN_BASE_SUITES.intersection(source.suites):
            return source
    raise SourceFailed(f"no Debian archive in {APT_SOURCES} or {APT_SOURCE_PARTS}/*.list|*.sources")


def run_tool(label: str, args: list[str], cwd: Path) -> None:
    try:
        done = subprocess.run(
            args, cwd=cwd, capture_output=True, text=True, timeout=300, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise SourceFailed(f"{label}: {exc}") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise SourceFailed(f"{label} exited {done.returncode}:\n{tail}")


def from_debian() -> Path:
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        raise SourceFailed("apt-get or dpkg is not installed")
    archive = debian_archive()
    apt_dir = TOOLS_DIR / "apt"
    lists, cache = apt_dir / "lists", apt_dir / "cache"
    for directory in (lists / "partial", cache / "archives" / "partial"):
        directory.mkdir(parents=True, exist_ok=True)
    sources_list = apt_dir / "sources.list"
    option = f"[signed-by={archive.signed_by}] " if archive.signed_by else ""
    sources_list.write_text(f"deb {option}{archive.uri} {DEBIAN_SUITE} main\n")
    log(f"apt: {archive.uri} suite {DEBIAN_SUITE}, state in {apt_dir}")
    options = {
        "Dir::Etc::SourceList": str(sources_list),
        "Dir::Etc::SourceParts": "/dev/null",
        "Dir::State::Lists": str(lists),
        "Dir::Cache": str(cache),
        "Acquire::Languages": "none",
    }
    if os.geteuid() == 0:
        # apt's download sandbox user (_apt) cannot write into our private directories.
        options["APT::Sandbox::User"] = "root"
    apt = ["apt-get", "-q", *(a for kv in options.items() for a in ("-o", "=".join(kv)))]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run_tool("apt-get update", [*apt, "update"], cwd=work)
        run_tool("apt-get download consul", [*apt, "download", "consul"], cwd=work)
        debs = sorted(work.glob("consul_*.deb"))
        if not debs:
            raise SourceFailed("apt-get download consul produced no .deb")
        run_tool("dpkg -x", ["dpkg", "-x", str(debs[0]), str(work / "root")], cwd=work)
        binary = work / "root" / "usr" / "bin" / "consul"
        if not binary.is_file():
            raise SourceFailed(f"{debs[0].name} has no usr/bin/consul")
        return checked_install(binary)


def checked_install(binary: Path) -> Path:
    if consul_version(binary) is None:
        raise SourceFailed(f"{binary} does not run `consul version`")
    return install(binary)


@contextlib.contextmanager
def provisioning_lock() -> Iterator[None]:
    """Serialize downloads between concurrent runs (e.g. parallel test workers)."""
    import fcntl

    TOOLS_DIR.mkdir(parents=True, exist_ok=True)
    with open(TOOLS_DIR / ".get_consul.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


SOURCES: list[tuple[str, Callable[[], Path | None]]] = [
    ("$CONSUL_BIN", from_env),
    ("consul on PATH", from_path),
    (f"project-local {LOCAL_CONSUL.relative_to(PROJECT_ROOT)}", from_project_tools),
    (f"HashiCorp release {HASHICORP_VERSION}", from_hashicorp),
    (f"Debian {DEBIAN_SUITE} package via apt", from_debian),
]


def try_sources(
    sources: list[tuple[str, Callable[[], Path | None]]], tried: list[str]
) -> Path | None:
    for name, source in sources:
        started = time.monotonic()
        try:
            candidate = source()
        except SourceFailed as exc:
            tried.append(f"{name}: {exc}")
            log(f"{name}: failed after {time.monotonic() - started:.1f}s: {exc}")
            continue
        if candidate is None:
            tried.append(f"{name}: not present")
            continue
        version = consul_version(candidate)
        elapsed = time.monotonic() - started
        if version is not None:
            log(f"using {candidate} ({version}) from {name}, {elapsed:.1f}s")
            return candidate.resolve()
        if source is from_env:
            raise ConsulNotFound(f"CONSUL_BIN={candidate} does not run `consul version`")
        tried.append(f"{name}: {candidate} does not run `consul version`")
        log(tried[-1])
    return None


def ensure_consul() -> Path:
    """Absolute path of a consul binary that runs, provisioning one if needed."""
    tried: list[str] = []
    found = try_sources(SOURCES[:3], tried)
    if found is None:
        with provisioning_lock():
            # Another process may have provisioned it while we waited for the lock.
            found = try_sources(SOURCES[2:], tried)
    if found is None:
        attempts = "\n  ".join(dict.fromkeys(tried))
        raise ConsulNotFound(f"no usable consul binary; tried:\n  {attempts}")
    return found


def main() -> int:
    try:
        print(ensure_consul())
    except ConsulNotFound as exc:
        log(str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
