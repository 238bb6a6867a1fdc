"""Regenerates the Python gRPC stubs of `protos/retrieval/v1/*.proto` (``--check``: fail if stale).

The generated package is ``retrieval.v1`` (files beside the ``.proto`` sources, never edited by
hand). Type stubs come from mypy-protobuf, so the servicers and clients type-check.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = PROTO_ROOT / "retrieval" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _include_dirs() -> list[str]:
    """Include paths: ours, protobuf's well-known types, googleapis' google/rpc/status.proto."""
    import google.rpc.status_pb2 as status_pb2
    import grpc_tools

    googleapis_root = Path(status_pb2.__file__).resolve().parent.parent.parent
    return [str(PROTO_ROOT), str(Path(grpc_tools.__file__).parent / "_proto"), str(googleapis_root)]


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc on every proto of the package into ``out_dir``; returns the generated files."""
    from grpc_tools import protoc

    plugin_dir = Path(sys.executable).parent
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PACKAGE_DIR.glob("*.proto"))
    args = [
        "grpc_tools.protoc",
        *(f"-I{d}" for d in _include_dirs()),
        f"--plugin=protoc-gen-mypy={plugin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={plugin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    pkg = out_dir / "retrieval" / "v1"
    return sorted(p for p in pkg.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the checked-in stubs are stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        if args.check:
            stale = [
                p.name
                for p in fresh
                if not (PACKAGE_DIR / p.name).exists() or not filecmp.cmp(p, PACKAGE_DIR / p.name, shallow=False)
            ]
            known = {p.name for p in fresh}
            extra = [p.name for p in PACKAGE_DIR.iterdir()
                     if p.name.endswith(GENERATED_SUFFIXES) and p.name not in known]
            if stale or extra:
                print(f"generated stubs are stale: {stale + extra}; run python scripts/gen_protos.py", file=sys.stderr)
                return 1
            print(f"generated stubs up to date ({len(fresh)} files)")
            return 0
        for p in fresh:
            shutil.copyfile(p, PACKAGE_DIR / p.name)
        for init in (PROTO_ROOT / "retrieval" / "__init__.py", PACKAGE_DIR / "__init__.py"):
            if not init.exists():
                init.write_text('"""Generated gRPC stubs of the retrieval API; rebuilt by scripts/gen_protos.py."""\n')
        print(f"wrote {len(fresh)} files to {PACKAGE_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
