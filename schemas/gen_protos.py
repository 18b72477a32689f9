"""Regenerate the committed gRPC stubs: python schemas/gen_protos.py (needs grpcio-tools)."""

from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    return protoc.main(
        ["protoc", f"-I{ROOT}", f"--python_out={ROOT}", f"--grpc_python_out={ROOT}", "schemas/weight_sync.proto"]
    )


if __name__ == "__main__":
    raise SystemExit(main())
