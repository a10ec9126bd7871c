"""Reading the OCI archives written by scripts/build-image, and running
containers from them with buildah (chroot isolation, vfs storage), the way a
node's runtime would: the command is the image's Entrypoint plus arguments,
the user is the image's User, and the root filesystem can be made read-only."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "target" / "image"
ARCHIVE = OUT / "bitbucket-operator.oci.tar"
SIMULATOR_ARCHIVE = OUT / "bitbucket-operator-simulator.oci.tar"
SBOM = OUT / "bitbucket-operator.cdx.json"
# The simulator-enabled binary build-image --with-simulator put in the test
# image; the tests also run it on the host as the Bitbucket a production
# container syncs from.
SIMULATOR_BINARY = OUT / "build" / "bitbucket-operator-simulator"


def _blob(digest: str) -> str:
    return "blobs/" + digest.replace(":", "/")


@dataclass
class LayerEntry:
    path: str  # absolute, e.g. /etc/passwd
    kind: str  # "file", "dir", "symlink", "other"
    mode: int
    uid: int
    gid: int
    size: int


class OciArchive:
    """An OCI image layout in a tar file with exactly one image."""

    def __init__(self, path: Path):
        self.path = path
        with tarfile.open(path) as tar:
            self._files = {m.name.lstrip("./"): tar.extractfile(m).read()
                           for m in tar.getmembers() if m.isfile()}
        self.index = json.loads(self._files["index.json"])
        assert len(self.index["manifests"]) == 1, self.index
        self.descriptor = self.index["manifests"][0]
        self.manifest = json.loads(self._files[_blob(self.descriptor["digest"])])
        self.config = json.loads(self._files[_blob(self.manifest["config"]["digest"])])

    @property
    def ref_name(self) -> str:
        return self.descriptor["annotations"]["org.opencontainers.image.ref.name"]

    @property
    def digest(self) -> str:
        return self.descriptor["digest"]

    @property
    def compressed_bytes(self) -> int:
        """What a registry stores and a node pulls: manifest, config, layers."""
        return (self.descriptor["size"] + self.manifest["config"]["size"]
                + sum(layer["size"] for layer in self.manifest["layers"]))

    def entries(self) -> list[LayerEntry]:
        """Every entry of every layer (one layer here; whiteouts not handled)."""
        out = []
        for layer in self.manifest["layers"]:
            blob = self._files[_blob(layer["digest"])]
            with tarfile.open(fileobj=io.BytesIO(blob)) as lt:
                for m in lt.getmembers():
                    kind = ("file" if m.isfile() else "dir" if m.isdir()
                            else "symlink" if m.issym() else "other")
                    out.append(LayerEntry("/" + m.name.lstrip("./").rstrip("/"), kind,
                                          m.mode, m.uid, m.gid, m.size))
        return out

    def read(self, path: str) -> bytes:
        for layer in self.manifest["layers"]:
            with tarfile.open(fileobj=io.BytesIO(self._files[_blob(layer["digest"])])) as lt:
                for m in lt.getmembers():
                    if "/" + m.name.lstrip("./") == path and m.isfile():
                        return lt.extractfile(m).read()
        raise FileNotFoundError(path)


class Buildah:
    """buildah with its own storage under `root`, so tests neither see nor
    leave containers in the machine's storage."""

    def __init__(self, root: Path):
        self.root = root
        self.base = ["buildah", "--storage-driver", "vfs",
                     "--root", str(root / "storage"), "--runroot", str(root / "run")]

    def __call__(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*self.base, *args], capture_output=True, text=True,
                              timeout=kw.pop("timeout", 300), **kw)

    def container_from(self, archive: OciArchive) -> "Container":
        r = self("from", "--quiet", f"oci-archive:{archive.path}")
        assert r.returncode == 0, r.stderr
        return Container(self, r.stdout.strip(), archive)

    def remove_all(self) -> None:
        self("rm", "--all")
        shutil.rmtree(self.root, ignore_errors=True)


class Container:
    def __init__(self, buildah: Buildah, name: str, archive: OciArchive):
        self.buildah = buildah
        self.name = name
        self.archive = archive

    def run(self, args: list[str], *, volumes: dict[Path, str] | None = None,
            env: dict[str, str] | None = None, read_only_root: bool = False,
            timeout: float = 120) -> subprocess.CompletedProcess:
        """Runs the image's Entrypoint with `args` (buildah run does not apply
        the Entrypoint itself, so it is taken from the image config), as the
        image's User, with host directories bind-mounted at the given paths.

        read_only_root: the container's root filesystem is bind-mounted
        read-only in a private mount namespace before buildah starts, as
        Kubernetes does for readOnlyRootFilesystem; only the volumes are
        writable. Like runc, which creates its mount targets before it makes
        the root read-only, the targets buildah mounts over (/etc/hostname,
        /run) are created first in this container's copy of the root; /run
        gets a small tmpfs because buildah creates and removes
        /run/.containerenv around every run."""
        cmd = [*self.buildah.base, "run", "--isolation", "chroot"]
        for host, target in (volumes or {}).items():
            cmd += ["--volume", f"{host}:{target}"]
        for key, value in (env or {}).items():
            cmd += ["--env", f"{key}={value}"]
        cmd += [self.name, "--", *self.archive.config["config"]["Entrypoint"], *args]
        if read_only_root:
            rootfs = self.mountpoint()
            (Path(rootfs) / "run").mkdir(exist_ok=True)
            (Path(rootfs) / "etc" / "hostname").touch()
            script = ('set -e; mount --bind "$1" "$1"; mount -o remount,bind,ro "$1"; '
                      'mount -t tmpfs -o size=1m,mode=0755 tmpfs "$1/run"; shift; exec "$@"')
            cmd = ["unshare", "--mount", "--propagation", "private", "--",
                   "sh", "-c", script, "sh", rootfs, *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)

    def mountpoint(self) -> str:
        r = self.buildah("mount", self.name)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()
