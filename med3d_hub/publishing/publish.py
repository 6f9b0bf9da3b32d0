"""Publish weights to a Hugging Face Hub, prove they load back, then list them in a manifest.

    publish("runs/3dseg8-r50", repo_id="org/med3d-resnet50-3dseg8", tag="3dseg8-v2",
            manifest="weights_manifest.json")                   # `med3d publish ...`

The steps, and what each one guarantees:

1. **Check.** The run is read and its weights checked (``run.read_run``: no NaN or infinite
   values, a strict load). The new entry is validated against the manifest: a ``model.tag`` the
   manifest (or the shipped one) already lists is refused unless ``force``.
2. **Export** into a temporary folder (``export.export``): weights, config, model card, record.
3. **Reach the Hub** with one metadata request bounded by ``HF_HUB_ETAG_TIMEOUT`` (default 10 s),
   no retries: a dead, silent or refusing server fails here, before anything is sent.
4. **Upload**: ``create_repo(exist_ok=True)`` and one ``create_commit`` holding every file. Its
   commit sha is the revision the entry pins; the Hub's sha256 of the weights must equal ours.
5. **Round trip**: a fresh Python process, with empty caches and ``MED3D_HUB_MANIFEST`` pointing
   at the candidate manifest (the target manifest with the new entry), runs
   ``create_model("name.tag", pretrained=True, ...)``: it downloads the weights at the pinned
   commit, verifies their sha256, loads them strictly, and its outputs on a fixed input must
   equal the local model's.
6. **Manifest**: only then is the entry written, atomically (``manifest.write_manifest``).

A failure at any step leaves the manifest byte for byte as it was, and says what is left on the
Hub. One publisher at a time per manifest: a file lock in the cache folder guards steps 1 to 6.

The token comes from ``token=``, ``HF_TOKEN`` or huggingface_hub's login. It goes to the client
and, through the environment, to the verifying process; it is never printed, logged or written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..errors import EXIT_PUBLISH_FAILED, EXIT_USAGE, Med3DError
from ..weights import hub, model_files
from ..weights.manifest import EntryExistsError, manifest_with_entry, read_manifest, shipped_entries, write_manifest
from .export import Exported, export
from .run import Run, read_run

__all__ = ["Published", "PublishError", "PublishRefused", "RoundTripError", "fixed_input", "manifest_entry", "publish"]

VERIFY_TIMEOUT = 900.0  # seconds for the fresh process: start, download, load, forward
FIXED_INPUT_SIZE = (32, 32, 32)


class PublishError(Med3DError, RuntimeError):
    """The upload or its verification failed; the message says what is on the Hub and that the manifest is unchanged."""

    exit_code = EXIT_PUBLISH_FAILED


class PublishRefused(PublishError):
    """Refused before anything was sent: no write access, or a public repo where a private one was asked for."""

    exit_code = EXIT_USAGE


class RoundTripError(PublishError):
    """The weights were uploaded, but a fresh process could not load them back identically."""


@dataclass(frozen=True)
class Published:
    """What ``publish`` did."""

    name: str  # model.tag
    repo_id: str
    revision: str  # the commit sha the entry pins
    commit_url: str
    sha256: str
    size: int
    manifest: Path
    entry: dict
    files: tuple[str, ...]
    round_trip: dict  # the fresh process's report


def fixed_input(in_chans: int) -> torch.Tensor:
    """The input both sides of the round trip run: seeded normal noise, 1 x in_chans x 32 x 32 x 32."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, in_chans, *FIXED_INPUT_SIZE, generator=generator)


def manifest_entry(run: Run, exported: Exported, *, repo_id: str, tag: str, revision: str, default: bool = False) -> dict:
    """The manifest entry of published weights (schema: docs/manifest-schema.md)."""
    from .. import __version__
    from .card import PAPER

    kwargs = model_files.create_model_kwargs(run.config)
    kwargs.pop("shortcut", None)
    source: dict[str, Any] = {
        "paper": PAPER,
        "datasets": [d.describe() for d in run.datasets],
        "training": (
            "co-trained with med3d_hub.train, one decoder branch per dataset; encoder published"
            if run.kind == "co-training run"
            else "published from a model folder (config.json + model.safetensors), head included"
        ),
        "code": f"med3d-hub {__version__}",
        "model_kwargs": kwargs,
    }
    if run.config.get("class_names"):
        source["class_names"] = list(run.config["class_names"])
    if run.step is not None:
        source["step"] = run.step
    if run.validation is not None:
        dice = {k: round(v, 4) for k, v in sorted(run.validation.dice.items())}
        if run.validation.mean is not None:
            dice["mean"] = round(run.validation.mean, 4)
        source["validation_dice"] = dice
    return {
        "model": run.architecture,
        "tag": tag,
        "default": default,
        "hf_hub_id": repo_id,
        "revision": revision,
        "filename": model_files.WEIGHTS_NAME,
        "sha256": exported.sha256,
        "size": exported.size,
        "format": "safetensors",
        "shortcut": run.config["shortcut"],
        "in_chans": run.config["in_chans"],
        "license": exported.license,
        "source": source,
        "preprocess": run.preprocess,
        "description": exported.description,
    }


def publish(
    source: str | os.PathLike | nn.Module,
    *,
    repo_id: str,
    tag: str,
    manifest: str | os.PathLike,
    private: bool = False,
    revision_message: str | None = None,
    force: bool = False,
    default: bool = False,
    license: str | None = None,
    preprocess: Mapping | None = None,
    checkpoint: str | os.PathLike | None = None,
    datasets: Sequence[str] | None = None,
    description: str | None = None,
    medicalnet_pth: bool = False,
    token: str | None = None,
    verify_timeout: float = VERIFY_TIMEOUT,
    echo: Callable[[str], None] | None = None,
) -> Published:
    """Upload a run (or a model folder, or a zoo model) to ``repo_id``, verify it, add ``model.tag`` to ``manifest``.

    See the module docstring for the steps. The Hub is ``HF_ENDPOINT`` (read now); for a
    self-hosted Hub also set ``HF_HUB_DISABLE_XET=1`` before huggingface_hub is imported.
    """
    echo = echo or (lambda _line: None)
    manifest = Path(manifest).expanduser().resolve()
    if not manifest.parent.is_dir() or not os.access(manifest.parent, os.W_OK):
        raise PublishRefused(f"cannot write the manifest {manifest}: its folder does not exist or is not writable")
    s = hub.settings(token=token)
    secret = _effective_token(token)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_scrubbed(secret))
        if isinstance(source, nn.Module):
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="med3d-model-")))
            model_files.write_model_files(folder, source)
            source = folder
        run = read_run(source, checkpoint=checkpoint, preprocess=preprocess, datasets=datasets)
        name = f"{run.architecture}.{tag}"
        echo(f"{name}: {run.kind} {run.path}" + (f", step {run.step}" if run.step is not None else ""))
        stack.enter_context(_manifest_lock(manifest, s))

        # 1. The entry must be acceptable before anything is uploaded.
        _check_not_shipped(run.architecture, tag, force)
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="med3d-publish-")))
        exported = _export_checked(run, scratch, manifest, repo_id=repo_id, tag=tag, force=force, default=default,
                                   license=license, medicalnet_pth=medicalnet_pth, description=description)
        echo(f"  exported {len(exported.files)} files ({exported.size / 1e6:.1f} MB of weights, sha256 {exported.sha256[:12]})")

        # 3-4. Reach the Hub, upload in one commit, compare the Hub's sha256 with ours.
        commit, commit_url = _upload_checked(exported, s, manifest, secret, repo_id=repo_id, private=private,
                                             message=revision_message or f"Publish {name} with med3d-hub", echo=echo)

        # 5. The round trip, against the candidate manifest.
        entry = manifest_entry(run, exported, repo_id=repo_id, tag=tag, revision=commit, default=default)
        document = manifest_with_entry(manifest, entry, replace=force)
        report = _round_trip(run, entry, document, s, token, verify_timeout, scratch, secret)
        how = "bitwise equal" if report["equal"] else f"equal within tolerance (max |diff| {report['max_abs_diff']:.3g})"
        echo(f"  round trip: a fresh process loaded {name} at {commit[:12]} from the Hub, sha256 verified, outputs {how}")

        # 6. Only now does the manifest change.
        replaced = manifest.exists() and any(e.name == name for e in read_manifest(manifest))
        write_manifest(manifest, document)
        echo(f"  manifest: {'replaced' if replaced else 'added'} {name} in {manifest}")
    return Published(name, repo_id, commit, commit_url, exported.sha256, exported.size, manifest, entry,
                     exported.files, report)


# -- steps ---------------------------------------------------------------------------------------------


def _export_checked(run: Run, scratch: Path, manifest: Path, *, repo_id: str, tag: str, force: bool, default: bool,
                    license: str | None, medicalnet_pth: bool, description: str | None) -> Exported:
    """Export the run into ``scratch`` and check that its entry would fit the manifest, before any upload."""
    exported = export(run, scratch / "export", license=license, medicalnet_pth=medicalnet_pth, repo_id=repo_id,
                      tag=tag, description=description)
    provisional = manifest_entry(run, exported, repo_id=repo_id, tag=tag, revision="main", default=default)
    try:
        manifest_with_entry(manifest, provisional, replace=force)
    except EntryExistsError as error:
        raise EntryExistsError(f"{error}; pass force=True (med3d publish --force) to replace it") from None
    return exported


def _upload_checked(exported: Exported, s: hub.Settings, manifest: Path, secret: str | None, *, repo_id: str,
                    private: bool, message: str, echo: Callable[[str], None]) -> tuple[str, str]:
    """Reach the Hub, upload every file in one commit, compare the Hub's sha256 with ours; the commit and its URL."""
    api = _api(s)
    info = _reach(api, repo_id, s, manifest, secret)
    if info is not None and private and not getattr(info, "private", False):
        raise PublishRefused(
            f"{repo_id} exists and is public; --private does not change an existing repo's visibility. "
            "Publish to a new repo, or make this one private on the Hub first. Nothing was uploaded."
        )
    echo(f"  uploading to {repo_id} on {s.endpoint} ({'private' if private or getattr(info, 'private', False) else 'public'} repo, one commit)")
    commit, commit_url = _upload(api, repo_id, exported, private, message, manifest, secret, exists=info is not None)
    echo(f"  commit {commit}")
    _check_remote_sha(api, repo_id, commit, exported, manifest, secret)
    return commit, commit_url


def _check_not_shipped(model: str, tag: str, force: bool) -> None:
    if force:
        return
    if any(e.model == model and e.tag == tag for e in shipped_entries()):
        raise EntryExistsError(
            f"{model}.{tag} is a release listed in the package's own manifest; publishing under that name would "
            "shadow it for everyone who loads your manifest. Choose another tag (or pass --force on purpose)"
        )


@contextlib.contextmanager
def _manifest_lock(manifest: Path, s: hub.Settings) -> Iterator[None]:
    """One publisher per manifest at a time (the lock file lives in the cache, not beside the manifest)."""
    key = "manifest-" + hashlib.sha256(str(manifest).encode()).hexdigest()[:32]
    with hub.weights_lock(key, s):
        yield


def _effective_token(token: str | None) -> str | None:
    """The token the client will send (for scrubbing messages only)."""
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # no token at all is fine
        return None


def _scrub(text: str, secret: str | None) -> str:
    """``text`` without the token, nor anything token-shaped a server echoed (see ``hub.redact``)."""
    return hub.redact(text, secret)


@contextlib.contextmanager
def _scrubbed(secret: str | None) -> Iterator[None]:
    """Any error leaving ``publish`` without the token: a server may echo the Authorization header (e.g. in an
    LFS batch answer), and huggingface_hub puts such answers in its messages."""
    try:
        yield
    except Exception as error:
        error.args = tuple(_scrub(a, secret) if isinstance(a, str) else a for a in error.args)
        raise


def _api(s: hub.Settings):
    from huggingface_hub import HfApi

    return HfApi(endpoint=s.endpoint, token=s.token if isinstance(s.token, str) else None)


def _reach(api, repo_id: str, s: hub.Settings, manifest: Path, secret: str | None):
    """The repo's info (None if it does not exist yet); a bounded request that fails fast on a dead Hub."""
    from huggingface_hub.utils import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    nothing = f"nothing was uploaded and {manifest.name} was not changed"
    try:
        return api.model_info(repo_id, timeout=s.timeout)
    except RepositoryNotFoundError:
        return None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise PublishRefused(
                f"the Hub at {s.endpoint} refused access to {repo_id} (HTTP {status}): set HF_TOKEN to a token with "
                f"write access, or run `hf auth login`; {nothing}"
            ) from None
        if status is None or status >= 500:
            raise hub.HubUnreachableError(f"the Hub at {s.endpoint} answered HTTP {status}; {nothing}") from None
        raise PublishError(_scrub(f"the Hub at {s.endpoint} refused {repo_id}: {error}; {nothing}", secret)) from None
    except OfflineModeIsEnabled:
        raise hub.HubUnreachableError(f"offline mode is on (HF_HUB_OFFLINE); {nothing}") from None
    except hub.transport_errors() as error:
        raise hub.HubUnreachableError(
            f"could not reach the Hub at {s.endpoint} (timeout {s.timeout:g} s): {type(error).__name__}: {error}; {nothing}. "
            "Check HF_ENDPOINT and the network"
        ) from None


_XET_HINT = (
    "the upload went through Xet storage, which this server does not offer. For a self-hosted Hub or a test "
    "server, set HF_HUB_DISABLE_XET=1 in the environment before Python starts (e.g. `HF_HUB_DISABLE_XET=1 med3d "
    "publish ...`); huggingface_hub reads it only when it is imported"
)


def _upload(api, repo_id: str, exported: Exported, private: bool, message: str, manifest: Path,
            secret: str | None, *, exists: bool) -> tuple[str, str]:
    """create_repo (for a new repo) + one create_commit with every exported file; returns (commit sha, commit URL).

    An existing repo is not created again: huggingface_hub 0.x reads the answer to that call against
    the endpoint of import time, and fails for any other.
    """
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.utils import HfHubHTTPError

    unchanged = f"{manifest.name} was not changed"
    try:
        if not exists:
            api.create_repo(repo_id, private=private, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(exported.folder / f)) for f in exported.files]
        info = api.create_commit(repo_id, operations, commit_message=message,
                                 commit_description=f"sha256 of {model_files.WEIGHTS_NAME}: {exported.sha256}")
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        hint = "; check that the token may write to this repo (HF_TOKEN, `hf auth login`)" if status in (401, 403) else ""
        raise PublishError(_scrub(f"the upload to {repo_id} failed: {error}{hint}; {unchanged}", secret)) from None
    except (ValueError, RuntimeError) as error:
        refused = _lfs_refusal(error, exported)
        if refused is None:
            raise
        raise PublishError(_scrub(f"the Hub refused the LFS upload to {repo_id} ({refused}); nothing was committed and "
                                  f"{unchanged}. Fix what the Hub names (quota, file size, token), then publish again",
                                  secret)) from None
    except hub.transport_errors() as error:
        if "xet" in str(error).lower():
            raise PublishError(f"{_XET_HINT}. Nothing was committed; {unchanged}") from None
        raise hub.HubUnreachableError(
            _scrub(f"the connection to the Hub failed during the upload to {repo_id} ({type(error).__name__}: {error}); "
                   f"the commit may not have been made; {unchanged}", secret)
        ) from None
    return info.oid, str(info.commit_url)


def _lfs_refusal(error: Exception, exported: Exported) -> str | None:
    """What the Hub said when it refused the LFS bytes of an upload, files named; None for any other error.

    huggingface_hub reports a refusal in the LFS batch answer as a ValueError ("LFS batch API returned
    errors"; "LFS batch endpoint returned errors" in 0.25, files by sha256) and one by the storage as a
    RuntimeError caused by the HTTP error.
    """
    from huggingface_hub.utils import HfHubHTTPError

    if isinstance(error, RuntimeError) and isinstance(error.__cause__, HfHubHTTPError):
        return f"{error} {error.__cause__}".replace("\n", " ")
    text = str(error)
    if not (isinstance(error, ValueError) and text.startswith(("LFS batch API returned errors",
                                                               "LFS batch endpoint returned errors"))):
        return None
    for name in exported.files:  # file names instead of sha256s: only on this error path
        oid = exported.sha256 if name == model_files.WEIGHTS_NAME else hub.sha256_file(exported.folder / name)
        text = text.replace(f"file with OID {oid}", f"'{name}'")
    return text.split(":", 1)[1].strip().replace("\n", "; ").replace("`", "")


def _check_remote_sha(api, repo_id: str, commit: str, exported: Exported, manifest: Path, secret: str | None) -> None:
    """The Hub must hold our bytes at the commit: its LFS sha256 and size of the weights equal ours."""
    from huggingface_hub.utils import HfHubHTTPError

    try:
        found = api.get_paths_info(repo_id, [model_files.WEIGHTS_NAME], revision=commit)
    except HfHubHTTPError as error:
        raise PublishError(_scrub(f"could not read back {repo_id}@{commit}: {error}; {manifest.name} was not changed", secret)) from None
    lfs = getattr(found[0], "lfs", None) if found else None
    remote = getattr(lfs, "sha256", None)
    if remote != exported.sha256 or getattr(found[0], "size", None) != exported.size:
        raise PublishError(
            f"the Hub holds other bytes for {model_files.WEIGHTS_NAME} at {repo_id}@{commit} (sha256 {remote}, "
            f"expected {exported.sha256}); {manifest.name} was not changed"
        )


def _round_trip(run: Run, entry: dict, document: dict, s: hub.Settings, token: str | None, timeout: float,
                scratch: Path, secret: str | None) -> dict:
    """Load ``model.tag`` in a fresh process through the candidate manifest; compare its outputs with ours."""
    from safetensors.torch import save_file

    folder = scratch / "round-trip"
    folder.mkdir()
    candidate = folder / "manifest.json"
    write_manifest(candidate, document)
    x = fixed_input(run.config["in_chans"])
    model = run.model.eval()
    with torch.no_grad():
        reference = {"input": x, "output": model(x).contiguous(), "features": model.forward_features(x).contiguous()}
    save_file(reference, str(folder / "reference.safetensors"))
    name = f"{entry['model']}.{entry['tag']}"
    kwargs = model_files.create_model_kwargs(run.config)
    request = {
        "name": name,
        "kwargs": kwargs,
        "repo_id": entry["hf_hub_id"],
        "revision": entry["revision"],
        "sha256": entry["sha256"],
        "reference": str(folder / "reference.safetensors"),
        "result": str(folder / "result.json"),
        "threads": torch.get_num_threads(),
    }
    (folder / "request.json").write_text(json.dumps(request))
    env = dict(os.environ)
    for variable in ("HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(variable, None)
    env.update(
        MED3D_HUB_MANIFEST=str(candidate),
        HF_HUB_CACHE=str(folder / "hf-cache"),  # empty caches: the weights must come from the Hub
        MED3D_HUB_CACHE=str(folder / "med3d-cache"),
        HF_ENDPOINT=s.endpoint,
    )
    if token:
        env["HF_TOKEN"] = token
    # The same med3d_hub as this process, whatever the working folder holds.
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    unchanged = "the manifest was not changed"
    where = f"{entry['hf_hub_id']}@{entry['revision']}"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "med3d_hub.publishing.publish", "--verify", str(folder / "request.json")],
            env=env, cwd=folder, capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise RoundTripError(
            f"the round trip of {name} did not finish within {timeout:g} s; the upload is at {where}, {unchanged}"
        ) from None
    try:
        report = json.loads(Path(request["result"]).read_text())
    except (OSError, ValueError):
        tail = _scrub((done.stderr or done.stdout or "").strip()[-1500:], secret)
        raise RoundTripError(
            f"the fresh process that loads {name} failed (exit {done.returncode}): {tail}; the upload is at {where}, {unchanged}"
        ) from None
    if not report.get("ok"):
        problems = "; ".join(report.get("problems") or ["unknown failure"])
        raise RoundTripError(_scrub(f"the round trip of {name} failed: {problems}; the upload is at {where}, {unchanged}", secret))
    return report


# -- the fresh process -----------------------------------------------------------------------------------


def _verify(request: dict) -> dict:
    """Load ``request['name']`` through the manifests and compare it with the reference outputs."""
    from huggingface_hub import hf_hub_download
    from safetensors.torch import load_file

    from ..weights.factory import create_model

    torch.set_num_threads(int(request["threads"]))
    problems: list[str] = []
    model = create_model(request["name"], pretrained=True, **request["kwargs"])
    cfg = model.pretrained_cfg or {}
    for key in ("sha256", "revision"):
        if cfg.get(key) != request[key]:
            problems.append(f"the loaded weights report {key} {cfg.get(key)!r}, expected {request[key]!r}")
    if cfg.get("hf_hub_id") != request["repo_id"]:
        problems.append(f"the weights came from {cfg.get('hf_hub_id')!r}, not {request['repo_id']!r}")
    if cfg.get("head") == "new":
        problems.append("the model's head was not in the file (it was freshly initialised)")
    s = hub.settings()
    downloaded = hf_hub_download(request["repo_id"], model_files.WEIGHTS_NAME, revision=request["revision"],
                                 cache_dir=s.hub_cache, local_files_only=True)
    actual = hub.sha256_file(downloaded)
    if actual != request["sha256"]:
        problems.append(f"the downloaded file has sha256 {actual}, expected {request['sha256']}")

    reference = load_file(request["reference"])
    model.eval()
    with torch.no_grad():
        output = model(reference["input"])
        features = model.forward_features(reference["input"])
    equal = torch.equal(output, reference["output"]) and torch.equal(features, reference["features"])
    diff = 0.0
    for mine, theirs in ((output, reference["output"]), (features, reference["features"])):
        if mine.shape != theirs.shape:
            problems.append(f"output shape {tuple(mine.shape)} differs from the local model's {tuple(theirs.shape)}")
            continue
        diff = max(diff, float((mine - theirs).abs().max()))
        scale = max(1.0, float(theirs.abs().max()))
        if diff > 1e-5 * scale:
            problems.append(f"the outputs differ from the local model's (max |diff| {diff:.3g})")
    return {"ok": not problems, "problems": problems, "name": request["name"], "sha256": actual,
            "revision": cfg.get("revision"), "head": cfg.get("head"), "equal": bool(equal), "max_abs_diff": diff,
            "file": str(downloaded)}


def _verify_main(argv: Sequence[str]) -> int:
    if len(argv) != 2 or argv[0] != "--verify":
        print("usage: python -m med3d_hub.publishing.publish --verify REQUEST.json (used by med3d publish)", file=sys.stderr)
        return 2
    request = json.loads(Path(argv[1]).read_text())
    try:
        report = _verify(request)
    except Exception as error:  # reported to the publishing process, which decides
        report = {"ok": False, "problems": [f"{type(error).__name__}: {error}"]}
    Path(request["result"]).write_text(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(_verify_main(sys.argv[1:]))
