"""SuperNode authentication keys: ECDSA P-384 pairs in OpenSSH format, as `ssh-keygen -t ecdsa -b 384` writes them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


@dataclass(frozen=True)
class NodeKeys:
    """A node's private key file (given to the SuperNode) and public key file (registered with the SuperLink)."""

    private: Path
    public: Path


def make_node_keys(path: Path) -> NodeKeys:
    """Write `path` (private key, mode 600) and `path.pub` (public key) for one SuperNode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    pub = Path(f"{path}.pub")
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
                    + f" {path.name}\n".encode())
    return NodeKeys(path, pub)
