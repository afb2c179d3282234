"""The Hugging Face Hub as a source: resolve ``ORG/NAME[@REVISION]``, fetch the small files,
read shard headers with Range requests, and download one weight shard at a time.

The endpoint is ``HF_ENDPOINT`` (read at call time) and the token comes from the usual
places (``HF_TOKEN``, ``huggingface-cli login``); it is never printed or written.
"""
from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from ..errors import AbliterateError
from .checkpoint import FOREIGN_WEIGHTS, Checkpoint, Shard
from .files import safe_name
from .safetensors_io import Header, header_length, parse_header

REPO_ID = r"[\w.-]+/[\w.-]+"  # ORG/NAME, as the Hub spells repo and dataset ids
_SPEC = re.compile(rf"^({REPO_ID})(?:@([\w./-]+))?$")


def is_repo_id(text: str) -> bool:
    """True for ``ORG/NAME`` that is not an existing local path."""
    return re.fullmatch(REPO_ID, text) is not None and not Path(text).exists()


def parse_spec(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision) for ``ORG/NAME[@REVISION]`` that is not a local path, else None. ORG/NAME
    where ORG is a local folder is taken for a mistyped path, not a repo."""
    m = _SPEC.match(spec)
    if not m or Path(spec).exists() or Path(spec).parent.is_dir():
        return None
    return m[1], m[2]


def endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def hub_error(exc: Exception, repo: str, action: str) -> AbliterateError:
    """One line for an HTTP failure: the status, the server's message, the repo. Never the token."""
    cause: BaseException | None = exc
    while cause is not None and getattr(getattr(cause, "response", None), "status_code", None) is None:
        cause = cause.__cause__ or cause.__context__
    status = getattr(getattr(cause, "response", None), "status_code", None)
    if status is None and _unreachable(exc):
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            return AbliterateError(f"{action} {repo}: HF_HUB_OFFLINE is set and the Hugging Face cache does not "
                                   "hold it; give a local checkpoint directory, or unset HF_HUB_OFFLINE")
        where = endpoint() or "the Hub"
        return AbliterateError(f"{action} {repo}: {where} cannot be reached ({_first_line(exc)}); give a local "
                               "checkpoint directory, set HF_ENDPOINT to a server that can be reached, or set "
                               "HF_HUB_OFFLINE=1 to use a model already in the Hugging Face cache")
    first = (str(cause or exc).splitlines() or [type(exc).__name__])[0]
    hint = {401: " (is HF_TOKEN set and valid?)", 403: " (does the token have write access?)"}.get(status or 0, "")
    return AbliterateError(f"{action} {repo}: {first}{hint}")


# Exceptions that mean no answer came (no route, no name resolution, refused, timed out, offline
# mode), by class name where they are the HTTP client's or huggingface_hub's own.
_NO_ANSWER = {"ConnectError", "ConnectTimeout", "ReadTimeout", "PoolTimeout", "OfflineModeIsEnabled",
              "LocalEntryNotFoundError"}


def _unreachable(exc: BaseException) -> bool:
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, (ConnectionError, TimeoutError, socket.gaierror)) or type(cause).__name__ in _NO_ANSWER:
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


class HubFiles:
    """Shards of a Hub repo: headers and small tensors by Range request, whole shards on demand."""

    def __init__(self, repo: str, revision: str, local_dir: Path | None) -> None:
        self.repo, self.revision, self.local_dir = repo, revision, local_dir

    def _url(self, name: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo, name, revision=self.revision, endpoint=endpoint())

    def read(self, shard: Shard, start: int, end: int) -> bytes:
        return self.read_range(shard.name, start, end)

    def read_range(self, name: str, start: int, end: int) -> bytes:
        from huggingface_hub import get_session
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

        response = get_session().get(self._url(name), headers={**build_hf_headers(), "Range": f"bytes={start}-{end - 1}"},
                                     follow_redirects=True)
        try:
            hf_raise_for_status(response)
        except Exception as exc:
            raise hub_error(exc, self.repo, f"read {name} from") from None
        data = response.content
        if len(data) != end - start:
            raise AbliterateError(f"{self.repo}/{name}: the server ignored the byte range ({len(data)} bytes)")
        return data

    def header(self, name: str, size: int) -> Header:
        head = self.read_range(name, 0, 8)
        return parse_header(head + self.read_range(name, 8, 8 + header_length(head, size, name)), size, name)

    def local(self, shard: Shard) -> AbstractContextManager[Path]:
        return self.fetch(shard.name)

    @contextmanager
    def fetch(self, name: str) -> Iterator[Path]:
        """Download the file; with a local_dir (--low-disk) delete it after the block."""
        path = self.download(name)
        try:
            yield path
        finally:
            if self.local_dir is not None:
                path.unlink(missing_ok=True)

    def download(self, name: str) -> Path:
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(self.repo, name, revision=self.revision, endpoint=endpoint(),
                                        local_dir=self.local_dir))
        except Exception as exc:
            raise hub_error(exc, self.repo, f"download {name} from") from None


def open_hub_checkpoint(repo: str, revision: str | None, local_dir: Path | None = None) -> Checkpoint:
    """A Checkpoint whose small files are downloaded and whose shards are fetched one at a time.

    Without ``local_dir`` files go through the normal Hugging Face cache.
    """
    sha, sizes = repo_files(repo, revision)
    files = HubFiles(repo, sha, local_dir)
    small = [n for n in sizes if not n.endswith(FOREIGN_WEIGHTS) and not hidden(n)]
    if "config.json" not in small:
        raise AbliterateError(f"{repo}@{sha}: no config.json; not a transformers model repo")
    paths = {n: files.download(n) for n in small}
    root = paths["config.json"].parent

    def header(name: str) -> Header:
        if sizes.get(name) is None:
            raise AbliterateError(f"{repo}@{sha}: shard {name} is missing or has no reported size")
        return files.header(name, int(sizes[name]))

    safetensors = sorted(n for n in sizes if n.endswith(".safetensors"))
    return Checkpoint.assemble(root, safetensors, header,
                               any(n.endswith(".bin") for n in sizes), files=files,
                               origin={"repo": repo, "revision": sha})


def repo_files(repo: str, revision: str | None) -> tuple[str, dict[str, int | None]]:
    """The commit ``revision`` resolves to, and every file of the repo there with its size (None
    where the Hub reports none); each name checked to be a plain relative name."""
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint()).model_info(repo, revision=revision, files_metadata=True)
    except Exception as exc:
        raise hub_error(exc, repo, "resolve") from None
    return str(info.sha), {safe_name(s.rfilename, f"{repo}@{info.sha}"): s.size for s in info.siblings or []}


def hidden(name: str) -> bool:
    """A name with a part that starts with a dot (.gitattributes, .cache/...): the repo's
    housekeeping, not the model's."""
    return any(p.startswith(".") for p in name.split("/"))


def download_checkpoint(repo: str, revision: str | None) -> Path:
    """The whole checkpoint in the Hugging Face cache (for the commands that load a model into
    memory), checked as ``open_hub_checkpoint`` checks it; its local snapshot folder."""
    ckpt = open_hub_checkpoint(repo, revision)
    for shard in ckpt.shards:
        with ckpt.files.local(shard):  # without --low-disk the shard stays in the cache, beside the config
            pass
    return ckpt.root
