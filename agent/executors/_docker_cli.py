"""Shared pieces of the docker-based executors: references, the CLI, registry login.

Registry credentials (`registry.username`, `registry.password` in the task's
credentials) are handed to `docker login --password-stdin` in a throwaway
DOCKER_CONFIG directory (mode 0700) that is deleted when the task ends: the
password is never in argv, the environment, the logs or the user's own
docker config.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from agent.executors.base import Reporter, Task, TaskFailed, run_process

IMAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
DOCKER_HUB = "docker.io"


def docker_binary() -> str:
    found = shutil.which("docker")
    if found is None:
        raise TaskFailed("the docker CLI was not found on this agent's PATH")
    return found


def text_field(payload: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    value = payload.get(name)
    if value is None:
        if required:
            raise TaskFailed(f"payload.{name} is required")
        return None
    if not isinstance(value, str) or not value:
        raise TaskFailed(f"payload.{name} must be a non-empty string")
    return value


def string_list(payload: dict[str, Any], name: str) -> list[str]:
    value = payload.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TaskFailed(f"payload.{name} must be a list of strings")
    return list(value)


def image_reference(payload: dict[str, Any]) -> str:
    """`image@sha256:…` when a digest is given (pull by digest), else `image:tag`."""
    image = text_field(payload, "image", required=True)
    assert image is not None
    if "@" in image or not IMAGE_RE.match(image):
        raise TaskFailed(
            f"payload.image {image!r} is not an image name (give a digest in payload.digest)"
        )
    digest = text_field(payload, "digest")
    if digest is not None:
        if not DIGEST_RE.match(digest):
            raise TaskFailed(f"payload.digest {digest!r} is not sha256:<64 hex digits>")
        return f"{image}@{digest}"
    tag = text_field(payload, "tag")
    if tag is not None:
        if not TAG_RE.match(tag):
            raise TaskFailed(f"payload.tag {tag!r} is not a valid tag")
        return f"{image}:{tag}"
    return image


def registry_host(payload: dict[str, Any]) -> str:
    """The registry to log in to: payload.registry, or the image's first component."""
    explicit = text_field(payload, "registry")
    if explicit is not None:
        if explicit.startswith("-"):
            raise TaskFailed(f"payload.registry {explicit!r} is not a registry host")
        return explicit
    image = str(payload.get("image") or "")
    first, sep, _ = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return DOCKER_HUB


@dataclass
class DockerSession:
    """The docker CLI for one task: its binary and environment."""

    docker: str
    env: dict[str, str]


@contextlib.contextmanager
def docker_session(task: Task) -> Iterator[DockerSession]:
    """A DOCKER_CONFIG of its own when the task carries credentials, removed afterwards."""
    docker = docker_binary()
    env = dict(os.environ)
    if not task.credentials:
        yield DockerSession(docker=docker, env=env)
        return
    config_dir = tempfile.mkdtemp(prefix="stella-docker-")  # mode 0700
    env["DOCKER_CONFIG"] = config_dir
    try:
        yield DockerSession(docker=docker, env=env)
    finally:
        shutil.rmtree(config_dir, ignore_errors=True)


async def login(session: DockerSession, task: Task, report: Reporter) -> None:
    """`docker login --password-stdin` when the task carries registry credentials."""
    username = task.credentials.get("registry.username")
    password = task.credentials.get("registry.password")
    if password is None and username is None:
        return
    if not isinstance(username, str) or not isinstance(password, str) or not username:
        raise TaskFailed("credentials need both registry.username and registry.password")
    host = registry_host(task.payload)
    await report.log("info", f"logging in to {host}")
    result = await run_process(
        [session.docker, "login", "--username", username, "--password-stdin", host],
        report,
        stdin=password.encode() + b"\n",
        env=session.env,
    )
    if result.returncode != 0:
        raise TaskFailed(f"docker login to {host} failed (exit {result.returncode})")
