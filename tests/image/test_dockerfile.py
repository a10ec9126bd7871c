"""The Dockerfile (for Docker users) and scripts/build-image (what CI builds
and tests) must give the same layout: binary path, entrypoint, default
command, user, store directory, features. Docker cannot run here, so this
compares the two definitions; it needs neither root nor buildah."""

from __future__ import annotations

import json
import re

from imagelib import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()
BUILD_IMAGE = (ROOT / "scripts" / "build-image").read_text()


def instructions(name: str) -> list[str]:
    """Arguments of every `name` instruction of the final stage, with line
    continuations joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    final = text[text.rindex("\nFROM "):]
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.*)$", final, re.M)]


def script_value(var: str) -> str:
    return re.search(rf"^{var}=(\S+)$", BUILD_IMAGE, re.M).group(1)


def test_same_entrypoint_command_and_user():
    binary = script_value("BIN_PATH")
    nonroot = script_value("NONROOT")
    assert [json.loads(e) for e in instructions("ENTRYPOINT")] == [[binary]]
    assert [json.loads(c) for c in instructions("CMD")] == [["run"]]
    assert instructions("USER") == [f"{nonroot}:{nonroot}"]
    assert f"/bitbucket-operator {binary}" in " ".join(instructions("COPY"))
    assert f"--chown={nonroot}:{nonroot} /store /var/lib/bitbucket-operator" in " ".join(instructions("COPY"))
    assert instructions("ENV") == ["SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"]
    assert "--env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" in BUILD_IMAGE


def test_same_production_build_flags():
    build = re.search(r"cargo build ([^&\n]*)", re.sub(r"\\\n\s*", " ", DOCKERFILE)).group(1)
    assert {"--release", "--locked", "--no-default-features"} <= set(build.split())
    assert "build_binary --no-default-features bitbucket-operator" in BUILD_IMAGE
    assert 'cargo build --release --locked $features' in BUILD_IMAGE


def test_same_labels():
    keys = set(re.findall(r"(org\.opencontainers\.image\.\w+)=", " ".join(instructions("LABEL"))))
    assert keys == set(re.findall(r"--label \"?(org\.opencontainers\.image\.\w+)=", BUILD_IMAGE))
    assert {"org.opencontainers.image.source", "org.opencontainers.image.version",
            "org.opencontainers.image.revision"} <= keys
