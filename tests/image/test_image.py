"""Tests of the container image: they run the image's own binary inside
containers (buildah, chroot isolation), never the host's. scripts/test builds
the archives first (scripts/build-image --with-simulator) and runs these;
SKIP_IMAGE_TESTS=1 skips both, for machines without root or buildah.

Two archives: the production image (no simulator), and a test-only image of
the same layout whose binary has the default features, so that
`sync --demo` can run inside a container."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from imagelib import (ARCHIVE, ROOT, SBOM, SIMULATOR_ARCHIVE, SIMULATOR_BINARY, Buildah,
                      OciArchive)

pytestmark = pytest.mark.skipif(os.environ.get("SKIP_IMAGE_TESTS") == "1",
                                reason="SKIP_IMAGE_TESTS=1")

NONROOT = 65532
BINARY = "/usr/local/bin/bitbucket-operator"
STORE_DIR = "/var/lib/bitbucket-operator"
# The size budget (README, "Container image"): the image as pulled, and as
# unpacked on a node.
MAX_COMPRESSED_MIB = 20
MAX_UNCOMPRESSED_MIB = 40


def cargo_version() -> str:
    return tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]["version"]


@pytest.fixture(scope="session")
def image() -> OciArchive:
    assert ARCHIVE.is_file(), f"{ARCHIVE} missing: run scripts/build-image --with-simulator"
    return OciArchive(ARCHIVE)


@pytest.fixture(scope="session")
def simulator_image() -> OciArchive:
    assert SIMULATOR_ARCHIVE.is_file(), f"{SIMULATOR_ARCHIVE} missing: run scripts/build-image --with-simulator"
    return OciArchive(SIMULATOR_ARCHIVE)


@pytest.fixture(scope="session")
def buildah(tmp_path_factory):
    b = Buildah(tmp_path_factory.mktemp("buildah"))
    yield b
    b.remove_all()


@pytest.fixture()
def volume(tmp_path):
    """A host directory for the store, writable by the image's user (what
    fsGroup does for the chart's emptyDir or PVC)."""
    d = tmp_path / "store"
    d.mkdir()
    os.chown(d, NONROOT, NONROOT)
    return d


@pytest.fixture()
def scratch_tmp(tmp_path):
    """The chart's /tmp emptyDir."""
    d = tmp_path / "tmp"
    d.mkdir()
    os.chown(d, NONROOT, NONROOT)
    return d


@pytest.fixture(scope="session")
def bitbucket():
    """The simulator on the host's loopback (chroot isolation shares the
    host's network): the Bitbucket a production container syncs from."""
    assert SIMULATOR_BINARY.is_file(), f"{SIMULATOR_BINARY} missing: run scripts/build-image --with-simulator"
    proc = subprocess.Popen(
        [str(SIMULATOR_BINARY), "simulate", "--listen", "127.0.0.1:0", "--seed", "7",
         "--workspaces", "1", "--users", "12", "--groups", "3", "--projects", "2",
         "--repositories", "6"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        start = json.loads(proc.stdout.readline())
        yield start
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def sync_env(bitbucket) -> dict[str, str]:
    creds = bitbucket["credentials"]
    return {"BATON_USERNAME": creds["email"], "BATON_APP_PASSWORD": creds["api_token"]}


def store_counts(db: Path) -> dict[str, int]:
    """Rows per table of a store file, opened read-only."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: con.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}
    finally:
        con.close()


def assert_ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"


# ------------------------------------------------------------- configuration


def test_config_runs_the_binary_as_nonroot_with_run_as_default(image):
    cfg = image.config["config"]
    assert cfg["User"] == f"{NONROOT}:{NONROOT}"
    assert cfg["Entrypoint"] == [BINARY]
    assert cfg["Cmd"] == ["run"]
    assert "8080/tcp" in cfg["ExposedPorts"]
    assert "8081/tcp" in cfg["ExposedPorts"]
    assert image.config["os"] == "linux" and image.config["architecture"] == "amd64"


def test_labels_name_source_version_and_revision(image):
    labels = image.config["config"]["Labels"]
    assert labels["org.opencontainers.image.source"].startswith("https://")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert labels["org.opencontainers.image.revision"] == head, "archive is stale: rebuild it"
    describe = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    assert labels["org.opencontainers.image.version"] == describe, "archive is stale: rebuild it"


def test_layout_is_the_binary_its_libraries_and_certificates_only(image, tmp_path):
    entries = {e.path: e for e in image.entries()}
    files = {p for p, e in entries.items() if e.kind == "file"}
    libraries = {p for p in files if re.search(r"\.so(\.\d+)*$", p)}
    assert files - libraries == {
        BINARY, "/etc/ssl/certs/ca-certificates.crt", "/etc/passwd", "/etc/group",
        "/etc/nsswitch.conf", "/etc/hosts", "/etc/resolv.conf",
    }
    # Exactly what the binary links: ldd of the image's binary, on this host
    # (the libraries were copied from it).
    binary = tmp_path / "bitbucket-operator"
    binary.write_bytes(image.read(BINARY))
    binary.chmod(0o755)
    ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    linked = set(re.findall(r"=> (/\S+)", ldd)) | set(re.findall(r"^\s*(/\S+) \(", ldd, re.M))
    assert libraries == linked
    # No shell or any other program: the binary is the only executable file
    # that is not a shared library.
    executables = {p for p in files - libraries if entries[p].mode & 0o111}
    assert executables == {BINARY}
    assert not [p for p in entries if Path(p).name in {"sh", "bash", "dash", "ash", "busybox"}]
    assert all(e.uid == 0 for p, e in entries.items() if p != STORE_DIR), "files are root's"
    store = entries[STORE_DIR]
    assert (store.uid, store.gid, stat.S_IMODE(store.mode)) == (NONROOT, NONROOT, 0o700)
    assert stat.S_IMODE(entries["/tmp"].mode) == 0o1777
    passwd = image.read("/etc/passwd").decode()
    assert f"nonroot:x:{NONROOT}:{NONROOT}:" in passwd
    assert not re.search(r":/(usr/)?s?bin/\w*sh$", passwd, re.M), "no login shell"
    certs = image.read("/etc/ssl/certs/ca-certificates.crt").decode()
    assert certs.count("-----BEGIN CERTIFICATE-----") > 100


def test_size_is_within_budget(image):
    uncompressed = sum(e.size for e in image.entries() if e.kind == "file")
    print(f"image {image.ref_name} {image.digest}: {image.compressed_bytes / 2**20:.1f} MiB "
          f"compressed, {uncompressed / 2**20:.1f} MiB uncompressed")
    assert image.compressed_bytes <= MAX_COMPRESSED_MIB * 2**20
    assert uncompressed <= MAX_UNCOMPRESSED_MIB * 2**20


def test_test_image_differs_from_production_only_in_the_binary(image, simulator_image):
    """What the simulator image proves (sync --demo inside the container)
    carries over to the production image: same layout, same config."""
    prod = {e.path: (e.kind, e.mode, e.uid, e.gid) for e in image.entries()}
    test = {e.path: (e.kind, e.mode, e.uid, e.gid) for e in simulator_image.entries()}
    assert prod == test
    assert image.config["config"] == simulator_image.config["config"]


def test_archive_name_is_what_the_chart_deploys_by_default(image):
    """After `kind load image-archive` (or `k3s ctr images import`) the
    chart's default values run this image, with pullPolicy IfNotPresent."""
    sys.path.insert(0, str(ROOT / "tests" / "chart"))
    import chartlib
    deployment = next(o for o in chartlib.render() if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == image.ref_name
    assert pod["containers"][0]["imagePullPolicy"] == "IfNotPresent"
    assert image.ref_name.endswith(":" + cargo_version())
    # The chart's securityContext matches the image's user.
    assert pod["securityContext"]["runAsUser"] == NONROOT


def test_sbom_lists_every_crate_of_the_production_build(image):
    """The SBOM beside the archive names every crate cargo compiles for the
    production build (no default features), at its locked version, and no
    dev-only crate. It may name a few more: cargo-cyclonedx takes features
    from `cargo metadata`, which unifies them with the dev-dependencies'."""
    sbom = json.loads(SBOM.read_text())
    assert sbom["bomFormat"] == "CycloneDX"
    assert sbom["metadata"]["component"]["name"] == "bitbucket-operator"
    listed = {(c["name"], c["version"]) for c in sbom["components"]}
    tree = subprocess.run(
        ["cargo", "tree", "--locked", "--offline", "-e", "normal,build", "--no-default-features",
         "--target", "x86_64-unknown-linux-gnu", "--prefix", "none", "--format", "{p}"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout
    resolved = {tuple(line.split()[:2]) for line in tree.splitlines() if line.strip()}
    resolved = {(name, version.removeprefix("v")) for name, version in resolved
                if name != "bitbucket-operator"}
    assert resolved <= listed, sorted(resolved - listed)
    dev_only = {"jsonschema", "tempfile", "json-patch"} - {name for name, _ in resolved}
    assert dev_only and not dev_only & {name for name, _ in listed}
    assert len(listed - resolved) <= 0.1 * len(resolved), sorted(listed - resolved)


# ------------------------------------------------------------------- running


def test_entrypoint_prints_the_version(image, buildah):
    r = buildah.container_from(image).run(["--version"])
    assert_ok(r)
    assert r.stdout.strip() == f"bitbucket-operator {cargo_version()}"


def test_default_command_starts_the_operator(image, buildah):
    """Entrypoint + Cmd (`run`) reaches the operator, which needs a cluster:
    without one it says so and exits, no crash or missing library."""
    cmd = image.config["config"]["Cmd"]
    r = buildah.container_from(image).run(cmd, timeout=60)
    assert r.returncode != 0
    assert "connecting to the Kubernetes API" in r.stderr, r.stderr
    assert "panicked" not in r.stderr and "error while loading shared libraries" not in r.stderr


def test_production_image_syncs_into_a_mounted_volume_as_nonroot(image, buildah, bitbucket,
                                                                  volume, scratch_tmp):
    r = buildah.container_from(image).run(
        ["sync", "--api-url", bitbucket["api_url"], "--db", f"{STORE_DIR}/inventory.db", "--json"],
        volumes={volume: STORE_DIR, scratch_tmp: "/tmp"}, env=sync_env(bitbucket),
        read_only_root=True)
    assert_ok(r)
    summary = json.loads(r.stdout)
    db = volume / "inventory.db"
    assert db.stat().st_uid == NONROOT, "the file is written by the image's user"
    counts = store_counts(db)
    assert counts["resources"] > 0 and counts["grants"] > 0
    assert summary["ok"] is True and summary["database"] == f"{STORE_DIR}/inventory.db"
    assert summary["total_requests"] > 0


def test_sync_demo_inside_the_container_with_a_read_only_root(simulator_image, buildah,
                                                              volume, scratch_tmp):
    r = buildah.container_from(simulator_image).run(
        ["sync", "--demo", "--db", f"{STORE_DIR}/demo.db"],
        volumes={volume: STORE_DIR, scratch_tmp: "/tmp"}, read_only_root=True, timeout=300)
    assert_ok(r)
    db = volume / "demo.db"
    assert db.is_file() and db.stat().st_uid == NONROOT
    counts = store_counts(db)
    assert counts["resources"] >= 120 + 80, counts  # the demo's users and repositories at least
    assert counts["grants"] > 0


def test_root_filesystem_is_read_only_outside_the_volumes(image, buildah, bitbucket):
    """The store directory belongs to the image's user, so only the
    read-only root stops this write; the same run with a writable root
    succeeds."""
    args = ["sync", "--api-url", bitbucket["api_url"], "--db", f"{STORE_DIR}/store.db",
            "--only", "groups"]
    r = buildah.container_from(image).run(args, env=sync_env(bitbucket), read_only_root=True)
    assert r.returncode == 1, r.stderr
    assert "store.db" in r.stderr
    assert_ok(buildah.container_from(image).run(args, env=sync_env(bitbucket)))


def test_process_is_not_root(image, buildah, bitbucket):
    """Root could write to /etc; the image's user cannot (the root
    filesystem is writable here, only permissions stop it)."""
    r = buildah.container_from(image).run(
        ["sync", "--api-url", bitbucket["api_url"], "--db", "/etc/store.db", "--only", "groups"],
        env=sync_env(bitbucket))
    assert r.returncode == 1
    assert "/etc/store.db" in r.stderr
