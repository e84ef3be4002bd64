"""The page's copies of the wire protocol against protocol/: web/lib/protocol.js's constants (and the wire
constants of web/lib/opus.js and web/lib/latency.js), the close codes it knows, and the error codes and end
reasons web/i18n.js has words for. The JavaScript modules are imported by Node itself (their values as the
browser computes them, not read with a regex), so a change on either side alone fails here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from websockets.frames import CloseCode

from procs.network.codec import UP_BITRATE
from procs.network.slots import CAPACITY_CLOSE_CODE
from protocol import EndReason, ErrorCode, constants, encode_client_audio, encode_server_audio

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "web"
NODE = shutil.which("node")
# Node prints every exported value that is not a function (classes included), as JSON.
DUMP = """
const dump = async (path) => Object.fromEntries(Object.entries(await import(path))
  .filter(([, value]) => typeof value !== 'function'));
const [protocol, opus, latency, i18n] = await Promise.all(process.argv.slice(1).map(dump));
console.log(JSON.stringify({ protocol, opus, latency, i18n }));
"""


@pytest.fixture(scope="module")
def page() -> dict[str, dict[str, Any]]:
    if NODE is None:
        pytest.skip("node is not installed (scripts/test runs the page's tests with it)")
    modules = [WEB / "lib" / "protocol.js", WEB / "lib" / "opus.js", WEB / "lib" / "latency.js",
               WEB / "i18n.js"]
    done = subprocess.run([NODE, "--input-type=module", "-e", DUMP, *(m.as_uri() for m in modules)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_protocol_js_holds_the_wire_constants_of_protocol(page: dict[str, dict[str, Any]]) -> None:
    expected = {
        "PROTOCOL_VERSION": constants.PROTOCOL_VERSION,
        "KIND_CLIENT_AUDIO": constants.CLIENT_AUDIO,
        "KIND_SERVER_AUDIO": constants.SERVER_AUDIO,
        "FRAME_MS": constants.FRAME_MS,
        "CLIENT_RATE": constants.IN_RATE,
        "SERVER_RATE": constants.OUT_RATE,
        "CLIENT_FRAME_SAMPLES": constants.IN_FRAME_SAMPLES,
        "SERVER_FRAME_SAMPLES": constants.OUT_FRAME_SAMPLES,
        # a whole binary frame, prefix byte included, as protocol.wire builds one
        "CLIENT_FRAME_BYTES": len(encode_client_audio(bytes(constants.IN_FRAME_BYTES))),
        "SERVER_FRAME_BYTES": len(encode_server_audio(bytes(constants.OUT_FRAME_BYTES))),
        "CLOSE": {
            "NORMAL": CloseCode.NORMAL_CLOSURE,
            "GOING_AWAY": CloseCode.GOING_AWAY,
            "POLICY": CloseCode.POLICY_VIOLATION,
            "TRY_AGAIN_LATER": CloseCode.TRY_AGAIN_LATER,
        },
    }
    # Every constant protocol.js exports is one the server has: a new one needs its counterpart here.
    assert page["protocol"] == expected
    assert page["protocol"]["CLOSE"]["TRY_AGAIN_LATER"] == CAPACITY_CLOSE_CODE  # the server's "full"


def test_the_pages_opus_and_block_constants_are_the_servers(page: dict[str, dict[str, Any]]) -> None:
    opus = page["opus"]
    assert opus["KIND_CLIENT_OPUS"] == constants.CLIENT_OPUS
    assert opus["KIND_SERVER_OPUS"] == constants.SERVER_OPUS
    assert opus["MAX_OPUS_PACKET_BYTES"] == constants.MAX_OPUS_PACKET_BYTES
    assert opus["OPUS_UP_BITRATE"] == UP_BITRATE  # what the Python client sends up at, too
    latency = page["latency"]
    assert latency["CAPTURE_FRAME_MS"] == constants.FRAME_MS
    assert latency["MODEL_FRAME_MS"] == constants.BLOCK_MS  # one model step


def _raised_as_protocol_errors() -> set[str]:
    """The codes the server raises for what a client sent that it could not read: the ProtocolErrors of the
    wire's decoders and of the network process (protocol/internal.py's are between our own processes)."""
    sources = [ROOT / "protocol" / "wire.py", *(ROOT / "procs" / "network").glob("*.py")]
    found = (re.findall(r"ProtocolError\(\s*ErrorCode\.(\w+)", path.read_text()) for path in sources)
    names = {name for names in found for name in names}
    assert names, "no ProtocolError(ErrorCode.X) found: the scan is broken"
    return {ErrorCode[name].value for name in names}


def test_the_page_has_words_for_every_error_code_and_no_other(page: dict[str, dict[str, Any]]) -> None:
    i18n = page["i18n"]
    malformed = set(i18n["MALFORMED_CODES"])
    for language in i18n["LANGUAGES"]:
        strings = i18n["STRINGS"][language]
        worded = {key.removeprefix("error.") for key in strings if key.startswith("error.")} - {"malformed"}
        assert "error.malformed" in strings
        assert not malformed & worded, f"{language}: codes both malformed and worded: {malformed & worded}"
        assert malformed | worded == {code.value for code in ErrorCode}, (
            f"{language}: the page's error codes differ from protocol.ErrorCode: "
            f"missing {set(ErrorCode) - malformed - worded}, unknown {(malformed | worded) - set(ErrorCode)}")
    assert malformed == _raised_as_protocol_errors()


def test_the_page_has_words_for_every_end_reason_and_no_other(page: dict[str, dict[str, Any]]) -> None:
    i18n = page["i18n"]
    for language in i18n["LANGUAGES"]:
        ends = {key.removeprefix("end.") for key in i18n["STRINGS"][language] if key.startswith("end.")}
        assert ends == {reason.value for reason in EndReason}, f"{language}: end reasons are not EndReason's"
