"""Receipt checks for MCP servers behind Attestplane.

Attestplane's gateway forwards a `tools/call` to a server only after the control plane decided
it and logged the decision; with the call it sends a *receipt*: a compact JWS (EdDSA) signed
by the control plane's epoch key, typed `attestplane-receipt+jwt`, in the `Attestplane-Receipt`
header and in `params._meta["io.attestplane/receipt"]`. A server that checks receipts runs only
calls that went through the control plane, with exactly the arguments that were decided.

The key that signs receipts is taken from the control plane's *verified attestation*
([`attested_key`]): the `attestplane-verify` binary checks the Nitro attestation document
against the AWS root and the expected PCRs, and the epoch key is the document's public key. A
key the host merely serves (a JWKS) is never used: the host is who receipts protect against.

Use with the PyPI `mcp` 2.x SDK:

    key = attested_key(document, pcrs="control-plane-pcrs.json")
    checker = ReceiptChecker(key, audience="https://weather.example/mcp")
    server = MCPServer("weather", middleware=[RequireReceipt(checker)])

Every check takes the time as a parameter; [`RequireReceipt`] reads the clock once per call.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = [
    "RECEIPT_HEADER",
    "RECEIPT_META_KEY",
    "RECEIPT_TYP",
    "MAX_LIFETIME_SECS",
    "LEEWAY_SECS",
    "ReceiptError",
    "MissingReceipt",
    "MalformedReceipt",
    "WrongKey",
    "WrongAudience",
    "WrongCall",
    "OtherArguments",
    "BadLifetime",
    "Expired",
    "NotYetValid",
    "Replayed",
    "ReplayCacheFull",
    "AttestationRefused",
    "VerifiedReceipt",
    "ReceiptChecker",
    "RequireReceipt",
    "arguments_hash",
    "attested_key",
]

RECEIPT_TYP = "attestplane-receipt+jwt"
RECEIPT_HEADER = "attestplane-receipt"
RECEIPT_META_KEY = "io.attestplane/receipt"
MAX_LIFETIME_SECS = 60
LEEWAY_SECS = 5
# The JSON-RPC error a refused call gets.
REFUSED_CODE = -32001


class ReceiptError(Exception):
    """Why a receipt was refused. Messages carry hashes, never argument values."""


class MissingReceipt(ReceiptError):
    """The call carries no receipt."""


class MalformedReceipt(ReceiptError):
    """Not a compact JWS of the receipt type, or a claim is missing or of the wrong type."""


class WrongKey(ReceiptError):
    """The signature does not verify with the control plane's attested key."""


class WrongAudience(ReceiptError):
    """The receipt is for another server."""


class WrongCall(ReceiptError):
    """The receipt is for another method or tool."""


class OtherArguments(ReceiptError):
    """The arguments received are not the ones the control plane decided on."""


class BadLifetime(ReceiptError):
    """`exp` is not after `iat`, or the two are more than 60 s apart."""


class Expired(ReceiptError):
    """The receipt expired."""


class NotYetValid(ReceiptError):
    """The receipt was issued in the future."""


class Replayed(ReceiptError):
    """The receipt was used before."""


class ReplayCacheFull(ReceiptError):
    """Too many unexpired receipts are remembered to remember one more."""


class AttestationRefused(Exception):
    """The control plane's attestation did not verify, or carries no Ed25519 key."""


def _b64url_decode(part: str) -> bytes:
    if not part or any(c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_" for c in part):
        raise MalformedReceipt("not base64url")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError) as e:
        raise MalformedReceipt("not base64url") from e


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def arguments_hash(arguments: Any) -> str:
    """base64url SHA-256 of the RFC 8785 canonical JSON of `arguments` (`None` hashes as `{}`),
    as the control plane computes it."""
    try:
        canonical = rfc8785.dumps({} if arguments is None else arguments)
    except Exception as e:  # rfc8785 refuses what is not I-JSON (e.g. integers beyond 2^53)
        raise OtherArguments(f"the arguments have no canonical form: {type(e).__name__}") from e
    return _b64url(hashlib.sha256(canonical).digest())


def key_id(key: Ed25519PublicKey) -> str:
    """The control plane's key id: hex SHA-256 of the raw public key."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return hashlib.sha256(key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()


@dataclass(frozen=True)
class VerifiedReceipt:
    """A receipt that checked out (only [`ReceiptChecker.verify`] makes one)."""

    claims: Mapping[str, Any]


class ReceiptChecker:
    """Checks receipts for one server: its audience (its registered resource URI), the control
    plane's attested key, and a bounded replay cache of unexpired `jti`s."""

    def __init__(self, key: Ed25519PublicKey, audience: str, *, replay_capacity: int = 100_000):
        self._key = key
        self._kid = key_id(key)
        self._audience = audience
        self._capacity = replay_capacity
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()

    def verify(
        self, token: str | None, *, method: str, tool: str, arguments: Any, now_s: int
    ) -> VerifiedReceipt:
        """Verifies `token` for a call of `method`/`tool` with `arguments` (as parsed) at
        `now_s` (Unix seconds), recording its `jti`. Every check runs before the `jti` is
        recorded, so a refused receipt does not use it up."""
        if not token:
            raise MissingReceipt("the call carries no receipt")
        parts = token.split(".")
        if len(parts) != 3:
            raise MalformedReceipt("not a compact JWS")
        try:
            header = json.loads(_b64url_decode(parts[0]))
            claims = json.loads(_b64url_decode(parts[1]))
        except (ValueError, UnicodeDecodeError) as e:
            raise MalformedReceipt("header or claims are not JSON") from e
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise MalformedReceipt("header or claims are not objects")
        if header.get("alg") != "EdDSA":
            raise MalformedReceipt(f"alg {header.get('alg')!r} is not EdDSA")
        if header.get("typ") != RECEIPT_TYP:
            raise MalformedReceipt(f"typ {header.get('typ')!r} is not {RECEIPT_TYP}")
        if "crit" in header:
            raise MalformedReceipt("crit is not understood")
        if header.get("kid") not in (None, self._kid):
            raise WrongKey("signed by another key (kid)")
        try:
            self._key.verify(_b64url_decode(parts[2]), f"{parts[0]}.{parts[1]}".encode())
        except InvalidSignature as e:
            raise WrongKey("the signature does not verify with the attested key") from e
        for name in ("iss", "aud", "sub", "usr", "ten", "mth", "tool", "args", "def", "jti"):
            if not isinstance(claims.get(name), str) or not claims[name]:
                raise MalformedReceipt(f"claim {name} is missing or malformed")
        for name in ("iat", "exp", "seq"):
            v = claims.get(name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise MalformedReceipt(f"claim {name} is missing or malformed")
        if claims["aud"] != self._audience:
            raise WrongAudience(f"receipt is for audience {claims['aud']!r}, not {self._audience!r}")
        if claims["mth"] != method or claims["tool"] != tool:
            raise WrongCall(f"receipt is for {claims['mth']} {claims['tool']!r}, not {method} {tool!r}")
        found = arguments_hash(arguments)
        if found != claims["args"]:
            raise OtherArguments(f"receipt is for other arguments (hash {claims['args']}, received {found})")
        iat, exp = claims["iat"], claims["exp"]
        if exp <= iat or exp - iat > MAX_LIFETIME_SECS:
            raise BadLifetime(f"iat {iat}, exp {exp}")
        if now_s >= exp + LEEWAY_SECS:
            raise Expired(f"expired at {exp}, now {now_s}")
        if now_s + LEEWAY_SECS < iat:
            raise NotYetValid(f"issued at {iat}, now {now_s}")
        with self._lock:
            jti = claims["jti"]
            if jti in self._seen:
                raise Replayed(f"receipt {jti} was used before")
            if len(self._seen) >= self._capacity:
                self._seen = {j: e for j, e in self._seen.items() if e + LEEWAY_SECS >= now_s}
                if len(self._seen) >= self._capacity:
                    raise ReplayCacheFull("too many unexpired receipts")
            self._seen[jti] = exp
        return VerifiedReceipt(claims=claims)


class RequireReceipt:
    """A `ServerMiddleware` for the PyPI `mcp` 2.x SDK: refuses every `tools/call` without a
    valid receipt (JSON-RPC error -32001), before the SDK validates, looks up or runs anything.

    The receipt is read from `params._meta["io.attestplane/receipt"]` or the
    `Attestplane-Receipt` header (both must agree when both are sent).
    """

    def __init__(
        self,
        checker: ReceiptChecker,
        *,
        methods: tuple[str, ...] = ("tools/call",),
        clock: Callable[[], float] = time.time,
    ):
        self._checker = checker
        self._methods = methods
        self._clock = clock

    async def __call__(self, ctx: Any, call_next: Any) -> Any:
        if ctx.method in self._methods:
            from mcp.shared.exceptions import MCPError

            params = ctx.params or {}
            meta = params.get("_meta") if isinstance(params.get("_meta"), dict) else {}
            in_meta = meta.get(RECEIPT_META_KEY)
            headers = getattr(ctx.request, "headers", None)
            in_header = headers.get(RECEIPT_HEADER) if headers is not None else None
            try:
                if in_meta is not None and in_header is not None and in_meta != in_header:
                    raise MalformedReceipt("the header and _meta carry different receipts")
                token = in_meta if in_meta is not None else in_header
                if token is not None and not isinstance(token, str):
                    raise MalformedReceipt("the receipt is not a string")
                self._checker.verify(
                    token,
                    method=ctx.method,
                    tool=params.get("name") if isinstance(params.get("name"), str) else "",
                    arguments=params.get("arguments"),
                    now_s=int(self._clock()),
                )
            except ReceiptError as e:
                raise MCPError(code=REFUSED_CODE, message=f"receipt refused: {type(e).__name__}: {e}") from e
        return await call_next(ctx)


def attested_key(
    document: bytes | str | Path,
    *,
    pcrs: str | Path,
    nonce: str | None = None,
    at_ms: int | None = None,
    max_age: str = "5m",
    root: str | Path | None = None,
    verifier: str | Path = "attestplane-verify",
) -> Ed25519PublicKey:
    """The control plane's epoch key from its attestation document, verified by the
    `attestplane-verify` binary: the AWS Nitro root (or `root`, a PEM, for a mock NSM in
    development), the expected PCRs (`pcrs`, a JSON file), the `nonce` you asked for (hex), and
    an age of at most `max_age` at `at_ms` (Unix milliseconds; default: now). Raises
    [`AttestationRefused`] unless the verdict is `verified` with a 32-byte public key."""
    path = Path(document) if not isinstance(document, bytes) else None
    if path is None:
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".cose", delete=False) as f:
            f.write(document)
            path = Path(f.name)
    at = str(at_ms if at_ms is not None else int(time.time() * 1000))
    args = [str(verifier), "attestation", "--json", "--at", at, "--pcrs", str(pcrs), "--max-age", max_age]
    if nonce is not None:
        args += ["--nonce", nonce]
    if root is not None:
        args += ["--root", str(root)]
    args.append(str(path))
    try:
        ran = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AttestationRefused(f"cannot run {verifier}: {e}") from e
    finally:
        if isinstance(document, bytes):
            path.unlink(missing_ok=True)
    try:
        verdict = json.loads(ran.stdout)
    except ValueError as e:
        raise AttestationRefused(f"{verifier} printed no verdict (exit {ran.returncode}): {ran.stderr.strip()}") from e
    if ran.returncode != 0 or verdict.get("verified") is not True:
        raise AttestationRefused(f"the attestation did not verify: {verdict.get('error', verdict)}")
    key_hex = (verdict.get("attestation") or {}).get("public_key")
    try:
        raw = bytes.fromhex(key_hex) if isinstance(key_hex, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise AttestationRefused("the attestation carries no Ed25519 public key")
    return Ed25519PublicKey.from_public_bytes(raw)
