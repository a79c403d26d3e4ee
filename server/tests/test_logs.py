"""The shard's JSON log lines, which the launcher reads back."""

import json
import logging
import sys

from sluice_server.logs import JsonLineFormatter


def record(message: str, *args: object, exc_info: object = None) -> logging.LogRecord:
    return logging.LogRecord(
        "sluice_server.service", logging.WARNING, __file__, 1, message, args, exc_info
    )


def test_a_record_is_one_json_line() -> None:
    line = JsonLineFormatter().format(record("rejected: %s", "block 9 out of range"))
    assert "\n" not in line
    assert json.loads(line) == {
        "level": "WARNING",
        "logger": "sluice_server.service",
        "message": "rejected: block 9 out of range",
    }


def test_a_traceback_follows_its_message() -> None:
    try:
        raise RuntimeError("device lost")
    except RuntimeError:
        line = JsonLineFormatter().format(record("step failed", exc_info=sys.exc_info()))
    message = json.loads(line)["message"]
    assert message.startswith("step failed\nTraceback (most recent call last):")
    assert message.endswith("RuntimeError: device lost")
