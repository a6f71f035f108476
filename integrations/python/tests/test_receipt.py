"""The receipt check against receipts made by the Rust encoder the gateway signs with
(fixtures/receipts.json, made and checked by tests/tests/peers_receipt.rs)."""

import asyncio
import base64
import json
import unittest
from pathlib import Path
from types import SimpleNamespace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from attestplane_receipt import (
    LEEWAY_SECS,
    Expired,
    MalformedReceipt,
    MissingReceipt,
    NotYetValid,
    OtherArguments,
    ReceiptChecker,
    Replayed,
    RequireReceipt,
    WrongAudience,
    WrongCall,
    WrongKey,
)

F = json.loads((Path(__file__).parent / "fixtures" / "receipts.json").read_text())
KEY = Ed25519PublicKey.from_public_bytes(bytes.fromhex(F["key"]))
OTHER_KEY = Ed25519PublicKey.from_public_bytes(bytes.fromhex(F["other_key"]))
ARGS = json.loads(F["arguments"])
NOW = F["iat"] + 1


def checker(key=KEY, audience=F["audience"]):
    return ReceiptChecker(key, audience)


def verify(c, token, *, tool=F["tool"], arguments=ARGS, now=NOW, method=F["method"]):
    return c.verify(token, method=method, tool=tool, arguments=arguments, now_s=now)


class ReceiptTests(unittest.TestCase):
    def test_a_receipt_made_by_the_rust_encoder_verifies(self):
        v = verify(checker(), F["receipt"])
        self.assertEqual(v.claims["seq"], 42)
        self.assertEqual(v.claims["sub"], "agent-7")

    def test_arguments_equal_as_json_verify_whatever_their_spelling(self):
        respelled = json.loads('{"\\u00fc":-0.5,"a":{"x":null,"y":true},"z":[1000,0.1,"\\u00e9A"]}')
        verify(checker(), F["receipt"], arguments=respelled)

    def test_no_receipt_is_refused(self):
        with self.assertRaises(MissingReceipt):
            verify(checker(), None)
        with self.assertRaises(MissingReceipt):
            verify(checker(), "")

    def test_a_receipt_for_other_arguments_is_refused(self):
        other = dict(ARGS, a={"y": False, "x": None})
        with self.assertRaises(OtherArguments):
            verify(checker(), F["receipt"], arguments=other)
        with self.assertRaises(OtherArguments):
            verify(checker(), F["receipt"], arguments=None)

    def test_a_receipt_for_another_tool_is_refused(self):
        with self.assertRaises(WrongCall):
            verify(checker(), F["receipt"], tool="delete_everything")

    def test_a_receipt_for_another_audience_is_refused(self):
        with self.assertRaises(WrongAudience):
            verify(checker(audience="http://127.0.0.1:7300/mcp/other"), F["receipt"])

    def test_an_expired_receipt_is_refused(self):
        verify(checker(), F["receipt"], now=F["exp"] + LEEWAY_SECS - 1)
        with self.assertRaises(Expired):
            verify(checker(), F["receipt"], now=F["exp"] + LEEWAY_SECS)

    def test_a_receipt_from_the_future_is_refused(self):
        with self.assertRaises(NotYetValid):
            verify(checker(), F["receipt"], now=F["iat"] - LEEWAY_SECS - 1)

    def test_a_replayed_receipt_is_refused(self):
        c = checker()
        verify(c, F["receipt"])
        with self.assertRaises(Replayed):
            verify(c, F["receipt"])
        # Another receipt (another jti) still passes.
        verify(c, F["receipt_other_jti"])

    def test_a_refused_receipt_does_not_use_up_its_jti(self):
        c = checker()
        with self.assertRaises(OtherArguments):
            verify(c, F["receipt"], arguments={})
        verify(c, F["receipt"])

    def test_a_receipt_signed_by_another_key_is_refused(self):
        with self.assertRaises(WrongKey):
            verify(checker(), F["receipt_by_other_key"])
        with self.assertRaises(WrongKey):
            verify(checker(key=OTHER_KEY), F["receipt"])

    def test_tampered_claims_are_refused(self):
        head, claims, sig = F["receipt"].split(".")
        decoded = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
        decoded["aud"] = "http://127.0.0.1:7300/mcp/other"
        forged = base64.urlsafe_b64encode(json.dumps(decoded).encode()).rstrip(b"=").decode()
        with self.assertRaises(WrongKey):
            checker(audience=decoded["aud"]).verify(
                f"{head}.{forged}.{sig}", method=F["method"], tool=F["tool"], arguments=ARGS, now_s=NOW
            )

    def test_a_token_of_another_type_is_refused(self):
        _, claims, sig = F["receipt"].split(".")
        for header in ({"alg": "EdDSA", "typ": "JWT"}, {"alg": "none", "typ": "attestplane-receipt+jwt"}):
            h = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
            with self.assertRaises(MalformedReceipt):
                verify(checker(), f"{h}.{claims}.{sig}")
        for garbage in ("a.b", "a.b.c.d", "!!.!!.!!"):
            with self.assertRaises(MalformedReceipt):
                verify(checker(), garbage)


class MiddlewareTests(unittest.TestCase):
    def run_middleware(self, params, headers):
        calls = []

        async def call_next(ctx):
            calls.append(ctx.method)
            return "ran"

        ctx = SimpleNamespace(
            method="tools/call", params=params, request=SimpleNamespace(headers=headers), request_id=1
        )
        mw = RequireReceipt(checker(), clock=lambda: NOW)
        return asyncio.run(mw(ctx, call_next)), calls

    def test_a_call_with_a_valid_receipt_runs(self):
        params = {"name": F["tool"], "arguments": ARGS, "_meta": {"io.attestplane/receipt": F["receipt"]}}
        self.assertEqual(self.run_middleware(params, {})[0], "ran")
        params = {"name": F["tool"], "arguments": ARGS}
        self.assertEqual(self.run_middleware(params, {"attestplane-receipt": F["receipt"]})[0], "ran")

    def test_a_call_without_a_receipt_never_runs(self):
        from mcp.shared.exceptions import MCPError

        for params, headers in (
            ({"name": F["tool"], "arguments": ARGS}, {}),
            ({"name": F["tool"], "arguments": {}}, {"attestplane-receipt": F["receipt"]}),
            (
                {"name": F["tool"], "arguments": ARGS, "_meta": {"io.attestplane/receipt": F["receipt"]}},
                {"attestplane-receipt": F["receipt_other_jti"]},
            ),
        ):
            with self.assertRaises(MCPError) as e:
                self.run_middleware(params, headers)
            self.assertEqual(e.exception.error.code, -32001)

    def test_other_methods_pass(self):
        ctx = SimpleNamespace(method="tools/list", params={}, request=None, request_id=1)

        async def call_next(_ctx):
            return "listed"

        self.assertEqual(asyncio.run(RequireReceipt(checker())(ctx, call_next)), "listed")


if __name__ == "__main__":
    unittest.main()
