"""Reading a user's text file (schedule, config, JSON state) so that any problem is one line.

Every reader of a file a user hands us goes through `read_text`: a missing file, a directory, a
permission problem or bytes that are not UTF-8 become a `UserError` naming the file, never a
`UnicodeDecodeError` traceback (which is a ValueError, so a plain `except OSError` misses it).
"""
import json

from megatron_ext.errors import UserError


def read_text(path: str, what: str = "file", error: type = UserError, newline=None) -> str:
    """The file's text (UTF-8); `what` names it in the message, `error` is the UserError subclass to
    raise, `newline` is `open`'s (the csv module wants "")."""
    try:
        with open(path, encoding="utf-8", newline=newline) as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise error(f"{path}: {what} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                    f"{exc.start})") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror})") from None


def read_json_file(path: str, what: str = "file", error: type = UserError):
    """The file's JSON value; a file that is not UTF-8 JSON is a one-line `error`."""
    text = read_text(path, what, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: {what} is not valid JSON ({exc})") from None
    except RecursionError:
        raise error(f"{path}: {what} is not valid JSON (nested too deeply)") from None
