"""The slice of the Kubernetes API server a worker pod's agent talks to: its own Pod object.

What sdfleet depends on, as kube-apiserver answers it (HTTPS with the cluster CA; the service
account's bearer token, else 401; RBAC, else 403; ``PATCH`` with a JSON merge patch, RFC 7386, else
415 for a content type it does not take; annotation values must be strings, else 400, as the
typed decoder of ``ObjectMeta`` refuses them; unknown pod 404; errors as ``Status`` objects).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

PATCH_TYPES = {
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/json-patch+json",
    "application/apply-patch+yaml",
}

UNKNOWN_FORMAT = (
    "the body of the request was in an unknown format - accepted media types include: "
    + ", ".join(sorted(PATCH_TYPES))
)
NOT_A_STRING = (
    'Pod in version "v1" cannot be handled as a Pod: json: cannot unmarshal number into Go struct field '
    "ObjectMeta.metadata.annotations of type string"
)


def _status(code: int, reason: str, message: str) -> JSONResponse:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
            "reason": reason, "code": code}  # fmt: skip
    return JSONResponse(body, status_code=code)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, ``null`` deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


@dataclass
class KubeApi:
    token: str
    allowed: bool = True
    """RBAC: whether the token may patch pods (else 403)."""
    pods: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    patches: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def add_pod(self, namespace: str, name: str) -> None:
        meta = {"name": name, "namespace": namespace, "annotations": {}}
        self.pods[(namespace, name)] = {"apiVersion": "v1", "kind": "Pod", "metadata": meta}

    def cost(self, namespace: str, name: str) -> str | None:
        annotations = self.pods[(namespace, name)]["metadata"].get("annotations") or {}
        return annotations.get("controller.kubernetes.io/pod-deletion-cost")

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.patch("/api/v1/namespaces/{namespace}/pods/{name}")
        async def patch_pod(namespace: str, name: str, request: Request) -> JSONResponse:
            if request.headers.get("authorization") != f"Bearer {self.token}":
                return _status(401, "Unauthorized", "Unauthorized")
            if not self.allowed:
                message = f'pods "{name}" is forbidden: cannot patch resource "pods" in "{namespace}"'
                return _status(403, "Forbidden", message)
            kind = request.headers.get("content-type", "").split(";")[0].strip()
            if kind not in PATCH_TYPES:
                return _status(415, "UnsupportedMediaType", UNKNOWN_FORMAT)
            if (namespace, name) not in self.pods:
                return _status(404, "NotFound", f'pods "{name}" not found')
            patch = json.loads(await request.body())
            if kind != "application/merge-patch+json":
                return _status(400, "BadRequest", "only merge patches are served by this test server")
            pod = merge_patch(self.pods[(namespace, name)], patch)
            annotations = pod["metadata"].get("annotations") or {}
            if any(not isinstance(v, str) for v in annotations.values()):
                return _status(400, "BadRequest", NOT_A_STRING)
            self.pods[(namespace, name)] = pod
            self.patches.append((name, patch))
            return JSONResponse(pod)

        return app


def self_signed(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca.crt, tls.crt, tls.key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.crt", directory / "tls.crt", directory / "tls.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths
