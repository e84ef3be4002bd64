"""Build a wheelhouse: everything this project needs at run time, as wheels for another machine's Python.

    scripts/wheelhouse                                                   # this machine's Python and platform
    scripts/wheelhouse --python 3.12 --platform manylinux_2_28_x86_64 --out wheelhouse/   # a GPU box
    # there, into the Python that already has torch:
    python -m pip install --no-index --no-deps wheelhouse/*.whl

For a machine with no network that already has its own torch (a GPU box, a pod's image): the wheelhouse
holds this project's wheel, moshi's (no dependencies: it pins torch<2.10; pyproject.toml lists what it
really needs), and every run-time dependency in pyproject.toml with their own dependencies, as binary
wheels for the named CPython version and manylinux platform. What that machine has and keeps (--have:
torch, numpy, safetensors, huggingface-hub by default) is left out, and so is everything reached only
through those (torch's nvidia-*, triton, sympy, ...; huggingface-hub's requests, ...): the machine's own
copies stay. A package we also need directly (tqdm, packaging) is carried even when the machine has it,
and `--no-deps` installs our copy over its copy; name it in --have to keep the machine's instead.

The resolution is uv's (`uv pip compile --python-version --python-platform --excludes`): pip cannot drop a
package from a resolution (it has constraints, no overrides or excludes), so resolving with pip would
resolve torch too, a CUDA build with its nvidia-* wheels for a Linux target, only to throw it away; and
pip's resolver cannot be given the box's torch as already there. uv resolves for a Python and platform
that this machine is not, and --excludes cuts the excluded packages and their whole subtree out of the
resolution. pip then downloads exactly those pins (`--no-deps --only-binary=:all:` with the target's
tags) and builds this project's wheel, so the files come through pip's configured registry and cache. uv
does not read pip's configuration: PIP_INDEX_URL / PIP_EXTRA_INDEX_URL are passed on to it when the UV_*
equivalents are unset.

The total must fit the 64 MiB that travels to the GPU box with the working tree (--max-mib): over that
the command fails, prints the list and leaves --out as it was.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.tags import Tag, compatible_tags, cpython_tags, platform_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parent.parent
MOSHI_VERSION = "0.2.13"  # as scripts/setup and deploy/install-python.sh install it
HAVE = "torch,numpy,safetensors,huggingface-hub"
MAX_MIB = 64.0
# The manylinux glibc versions uv's --python-platform names (x86_64-manylinux_2_N, aarch64-...).
UV_GLIBC = (17, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40)
LEGACY = {"manylinux1": 5, "manylinux2010": 12, "manylinux2014": 17}  # the old names, as manylinux_2_N
ARCHES = ("x86_64", "aarch64")


def fail(msg: str) -> None:
    sys.exit(f"wheelhouse: {msg}")


def say(msg: str) -> None:
    print(f"wheelhouse: {msg}", file=sys.stderr, flush=True)


def parse_platform(tag: str) -> tuple[int, str]:
    """manylinux_2_28_x86_64 -> (28, "x86_64"); the legacy names too."""
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", tag)
    if m:
        glibc, arch = int(m[1]), m[2]
    else:
        m = re.fullmatch(r"(manylinux1|manylinux2010|manylinux2014)_(\w+)", tag)
        if not m:
            fail(f"--platform {tag}: only manylinux targets are supported (e.g. manylinux_2_28_x86_64)")
        glibc, arch = LEGACY[m[1]], m[2]
    if arch not in ARCHES:
        fail(f"--platform {tag}: architecture {arch} is not one of {', '.join(ARCHES)}")
    return glibc, arch


def pip_platforms(glibc: int, arch: str) -> list[str]:
    """Every platform tag a wheel for that glibc may carry: pip's --platform matches a tag exactly, so
    manylinux_2_28 must also name manylinux_2_27 ... manylinux_2_5 and the legacy aliases."""
    tags = [f"manylinux_2_{n}_{arch}" for n in range(glibc, 4, -1)]
    return tags + [f"{name}_{arch}" for name, n in LEGACY.items() if n <= glibc]


def this_platform() -> str:
    for tag in platform_tags():
        if re.fullmatch(r"manylinux_2_\d+_\w+", tag):
            return tag
    fail("this machine is not a manylinux one: name the target with --platform")
    raise AssertionError  # unreachable


def find_uv() -> str:
    try:
        from uv import find_uv_bin  # the `uv` package from PyPI (the test extras install it)

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        pass
    found = shutil.which("uv")
    if not found:
        fail("uv is missing: run scripts/setup (the test extras bring it) or `pip install 'uv>=0.10'`")
    return found


def uv_env() -> dict[str, str]:
    env = dict(os.environ)
    if "PIP_INDEX_URL" in env and not ({"UV_INDEX_URL", "UV_DEFAULT_INDEX"} & env.keys()):
        env["UV_DEFAULT_INDEX"] = env["PIP_INDEX_URL"]
    if "PIP_EXTRA_INDEX_URL" in env and not ({"UV_EXTRA_INDEX_URL", "UV_INDEX"} & env.keys()):
        env["UV_EXTRA_INDEX_URL"] = env["PIP_EXTRA_INDEX_URL"]
    return env


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    """Runs quietly; on failure prints what the command said and stops."""
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        fail(f"failed ({done.returncode}): {' '.join(cmd)}")
    return done


def resolve(requirements: list[Requirement], have: set[str], python: str, uv_platform: str,
            tmp: Path) -> list[Requirement]:
    """The pinned closure of `requirements` for the target, without `have` and what only they need."""
    req_in = tmp / "requirements.in"
    req_in.write_text("".join(f"{r}\n" for r in requirements))
    excludes = tmp / "excludes.txt"
    excludes.write_text("".join(f"{name}\n" for name in sorted(have)))
    out = run([find_uv(), "pip", "compile", str(req_in), "--quiet", "--no-header", "--no-annotate",
               "--python", sys.executable, "--no-python-downloads",  # the target is --python-version's
               "--python-version", python, "--python-platform", uv_platform, "--only-binary", ":all:",
               "--excludes", str(excludes)], env=uv_env()).stdout
    pins = [Requirement(line) for line in out.splitlines() if line.strip() and not line.startswith("#")]
    if leaked := sorted(r.name for r in pins if canonicalize_name(r.name) in have):
        fail(f"the resolution still holds {', '.join(leaked)}: this uv does not apply --excludes")
    return pins


def copy_source(dest: Path) -> None:
    """The working tree's files (tracked, or untracked and not ignored), so nothing stale in build/ or
    *.egg-info gets into the wheel and the checkout gets no build output of this run."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT).stdout
        for rel in filter(None, listed.split("\0")):
            if (ROOT / rel).is_file():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, dest / rel)
    else:
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", "wheelhouse", "artifacts", ".cache"))


def target_tags(python: str, platforms: list[str]) -> set[Tag]:
    version = tuple(int(p) for p in python.split("."))
    abi = "cp" + python.replace(".", "")
    return set(cpython_tags(version, [abi], platforms)) | set(compatible_tags(version, abi, platforms))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/wheelhouse", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    parser.add_argument("--python", default=here, help=f"the target's CPython version X.Y (default {here})")
    parser.add_argument("--platform", default=None,
                        help="the target's manylinux platform tag, e.g. manylinux_2_28_x86_64 (default: this "
                             "machine's)")
    parser.add_argument("--out", type=Path, default=Path("wheelhouse"),
                        help="the directory to write (default wheelhouse/); its old wheels are replaced")
    parser.add_argument("--have", default=HAVE,
                        help="comma-separated packages the target already has and keeps: left out, with "
                             f"whatever only they need (default {HAVE}); '' for none")
    parser.add_argument("--max-mib", type=float, default=MAX_MIB,
                        help=f"fail if the wheels add up to more (default {MAX_MIB:g}: what travels to the "
                             "GPU box)")
    parser.add_argument("--moshi-version", default=MOSHI_VERSION, help=f"default {MOSHI_VERSION}")
    args = parser.parse_args(argv)

    if not re.fullmatch(r"3\.\d+", args.python):
        fail(f"--python {args.python}: give a CPython 3 version as X.Y, e.g. 3.12")
    platform = args.platform or this_platform()
    glibc, arch = parse_platform(platform)
    usable = [n for n in UV_GLIBC if n <= glibc]
    if not usable:
        fail(f"--platform {platform}: uv resolves for manylinux_2_17 and newer only")
    uv_platform = f"{arch}-manylinux_2_{usable[-1]}"
    platforms = pip_platforms(glibc, arch)
    have = {canonicalize_name(n) for n in args.have.split(",") if n.strip()}

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    if args.python + ".0" not in SpecifierSet(project["requires-python"]):
        fail(f"--python {args.python}: {project['name']} requires Python {project['requires-python']}")
    wanted = [r for r in map(Requirement, project["dependencies"]) if canonicalize_name(r.name) not in have]
    if canonicalize_name("moshi") in have:
        fail("moshi cannot be in --have: its wheel is always carried")

    out: Path = args.out
    if out.exists() and (other := sorted(p.name for p in out.iterdir()
                                         if p.suffix != ".whl" and p.name != "README.txt")):
        fail(f"{out} holds other files ({', '.join(other[:5])}): give a new or wheelhouse-only directory")

    say(f"target CPython {args.python} on {platform} (uv: {uv_platform}); left out: "
        f"{', '.join(sorted(have)) or 'nothing'}")
    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as tmp_name:
        tmp = Path(tmp_name)
        pins = resolve(wanted, have, args.python, uv_platform, tmp)
        say(f"resolved {len(pins)} packages: {' '.join(str(p) for p in pins)}")

        wheels = tmp / "wheels"
        pins_txt = tmp / "pins.txt"
        pins_txt.write_text("".join(f"{p}\n" for p in pins))
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
        run([*pip, "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", args.python,
             "--implementation", "cp", "--abi", "cp" + args.python.replace(".", ""),
             *(f"--platform={p}" for p in platforms), "--dest", str(wheels), "--requirement", str(pins_txt),
             f"moshi=={args.moshi_version}"])
        src = tmp / "src"
        copy_source(src)
        run([*pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(src)])

        found = sorted(wheels.iterdir(), key=lambda p: (-p.stat().st_size, p.name))
        if odd := [p.name for p in found if p.suffix != ".whl"]:
            fail(f"not wheels: {', '.join(odd)}")
        names: dict[str, str] = {}
        allowed = target_tags(args.python, platforms)
        for path in found:
            name, _, _, tags = parse_wheel_filename(path.name)
            if name in names:
                fail(f"two wheels of {name}: {names[name]} and {path.name}")
            names[name] = path.name
            if name in have:
                fail(f"{path.name} is one of --have")
            if not tags & allowed:
                fail(f"{path.name} does not install on CPython {args.python} {platform}")

        total = sum(p.stat().st_size for p in found)
        listing = [f"{p.stat().st_size / 2**20:8.2f} MiB  {p.name}" for p in found]
        print("\n".join(listing))
        print(f"{total / 2**20:8.2f} MiB  total, {len(found)} wheels")
        if total > args.max_mib * 2**20:
            fail(f"{total / 2**20:.1f} MiB is over the {args.max_mib:g} MiB limit; {args.out} is unchanged. "
                 "Leave out more with --have (packages the target already has), or raise --max-mib.")

        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("*.whl"):
            old.unlink()
        for path in found:
            shutil.move(path, out / path.name)

    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["scripts/wheelhouse", "--python", args.python, "--platform", platform,
                        "--out", str(args.out), "--have", ",".join(sorted(have)) or "''"])
    (out / "README.txt").write_text(f"""\
A wheelhouse of {project['name']} {project['version']} for a machine with no network, built {when} by
    {command}

Target: CPython {args.python}, {platform} (resolved by uv as {uv_platform}).
Not here, because the target must already have them (and what they need): {', '.join(sorted(have)) or '-'}.

Install, into the Python that has those (on the GPU box: python3), from the folder that holds {out.name}/:
    python -m pip install --no-index --no-deps {out.name}/*.whl
(--no-deps: nothing is resolved there, and packages listed here replace the machine's own copies.)
Then, from a checkout of the project: PYTHON=python3 bench/gpu_check   (--tiny on a CPU)

{len(found)} wheels, {total / 2**20:.2f} MiB:
""" + "\n".join(listing) + "\n")
    say(f"wrote {len(found)} wheels ({total / 2**20:.1f} MiB) and README.txt to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
