"""Format-level text extraction: e-mail, HTML, roff man pages, dictd dictionaries, R lazy-load data.

Pure functions on bytes/str so tests can feed them small synthetic inputs.
"""
import email
import email.header
import gzip
import html
import re
import struct
import zlib
import bz2
import lzma


def decode(data: bytes, fallback: str = "latin-1") -> str:
    """UTF-8 if it is valid, else `fallback` (old corpora mix both); never raises."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode(fallback, errors="replace")


def tidy(text: str) -> str:
    """Normalize newlines, strip trailing spaces, squeeze 3+ blank lines to one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ---- HTML -------------------------------------------------------------------------------------
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
_HTML_INVISIBLE = re.compile(r"<(script|style|head|title)\b.*?</\1\s*>", re.S | re.I)
_HTML_BLOCK = re.compile(r"<\s*/?\s*(?:p|div|br|tr|li|h[1-6]|table|blockquote|pre|hr)\b[^>]*>", re.I)
_HTML_TAG = re.compile(r"<[^>]*>")


def html_to_text(markup: str) -> str:
    """Visible text of an HTML fragment: scripts/styles dropped, block tags become line breaks.

    Regexes rather than html.parser: spam HTML is often malformed and the parser is 10x slower.
    """
    text = _HTML_INVISIBLE.sub("", _HTML_COMMENT.sub("", markup))
    text = html.unescape(_HTML_TAG.sub("", _HTML_BLOCK.sub("\n", text)))
    lines = (re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.split("\n"))
    return tidy("\n".join(lines))


# ---- e-mail -----------------------------------------------------------------------------------
def _payload_text(part) -> str:
    raw = part.get_payload(decode=True) or b""
    charset = part.get_content_charset() or "utf-8"
    try:
        return raw.decode(charset)
    except (LookupError, UnicodeDecodeError):  # unknown charset ("default", "x-unknown") or wrong label
        return raw.decode("latin-1")


def _header_text(value) -> str:
    if value is None:
        return ""
    out = []
    try:
        for chunk, charset in email.header.decode_header(str(value)):
            if isinstance(chunk, bytes):
                try:
                    chunk = chunk.decode(charset or "latin-1")
                except (LookupError, UnicodeDecodeError):
                    chunk = chunk.decode("latin-1")
            out.append(chunk)
    except email.errors.HeaderParseError:
        return str(value)
    return " ".join("".join(out).split())


def email_to_text(raw: bytes, drop_quoted: bool = True) -> str:
    """`Subject: ...` plus the message body: text/plain parts, else the HTML part as text.

    Headers are dropped; quoted `>` lines are dropped (they repeat earlier messages of the thread).
    """
    msg = email.message_from_bytes(raw)
    plain, markup = [], []
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        if ctype == "text/plain":
            plain.append(_payload_text(part))
        elif ctype == "text/html":
            markup.append(_payload_text(part))
    body = "\n\n".join(plain) if plain else "\n\n".join(html_to_text(m) for m in markup)
    if drop_quoted:
        body = "\n".join(line for line in body.splitlines() if not line.lstrip().startswith(">"))
    body = tidy(body)
    if not body:
        return ""
    subject = _header_text(msg["Subject"])
    return f"Subject: {subject}\n\n{body}" if subject else body


# ---- roff (man pages) -------------------------------------------------------------------------
_ROFF_CHARS = {"em": "\u2014", "en": "\u2013", "hy": "-", "aq": "'", "dq": '"', "lq": "\u201c", "rq": "\u201d",
               "oq": "\u2018", "cq": "\u2019", "bu": "\u2022", "co": "\u00a9", "rg": "\u00ae", "tm": "\u2122",
               "mu": "\u00d7", "de": "\u00b0", "+-": "\u00b1", "<=": "\u2264", ">=": "\u2265", "->": "\u2192",
               "ti": "~", "ha": "^", "rs": "\\", "ga": "`", "at": "@", "sh": "#", "Do": "$", "ba": "|"}
_ROFF_ESCAPES = [
    (re.compile(r"\\f(?:\[[^\]]*\]|\(..|.)"), ""),             # font changes \fB \f(CW \f[B]
    (re.compile(r"\\s[+-]?(?:\d|\(\d\d|\[\d+\])"), ""),        # size changes \s-1 \s0
    (re.compile(r"\\\*(?:\[[^\]]*\]|\(..|.)"), ""),            # string interpolation \*(Tm
    (re.compile(r"\\[nwkhvlL]'[^']*'"), ""),                   # \w'..' \h'..' motions and widths
    (re.compile(r"\\n(?:\[[^\]]*\]|\(..|.)"), ""),             # number registers
    (re.compile(r"\\[&%|^c:)/,]"), ""),                        # zero-width escapes, italic corrections
    (re.compile(r"\\[ ~0]"), " "),                             # unbreakable spaces
    (re.compile(r"\\[-e]"), lambda m: "-" if m.group(0) == "\\-" else "\\"),
]
_ROFF_CHAR = re.compile(r"\\(?:\((..)|\[([^\]]+)\])")
_ROFF_TEXT_MACROS = {"SH", "SS", "B", "I", "SM", "SB", "TP", "IP", "HP", "Nm", "Nd", "Sh", "Ss"}
_ROFF_ALT_MACROS = {"BR", "RB", "IR", "RI", "BI", "IB"}
_ROFF_BREAKS = {"PP", "LP", "P", "sp", "br", "TP", "IP", "HP", "SH", "SS", "Sh", "Ss", "Pp"}


def _roff_args(line: str) -> list[str]:
    return [a[1:-1] if a.startswith('"') and a.endswith('"') and len(a) > 1 else a
            for a in re.findall(r'"[^"]*"|\S+', line)]


def _roff_inline(text: str) -> str:
    for pattern, repl in _ROFF_ESCAPES:
        text = pattern.sub(repl, text)
    text = _ROFF_CHAR.sub(lambda m: _ROFF_CHARS.get(m.group(1) or m.group(2), ""), text)
    return text.replace("\\\\", "\\")


def roff_to_text(source: str) -> str:
    """Readable text of a man page in roff: requests dropped, headings and text macros kept.

    A light regex de-roff (no groff run per page): keeps prose and option names, drops layout.
    """
    out = []
    for line in source.split("\n"):
        if line.startswith((".\\\"", "'\\\"", '.\\"', "\\\"")) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].strip().split(None, 1)
            if not parts:
                continue
            macro, rest = parts[0], (parts[1] if len(parts) > 1 else "")
            if macro in _ROFF_BREAKS:
                out.append("")
            if macro in _ROFF_TEXT_MACROS and rest:
                out.append(_roff_inline(" ".join(_roff_args(rest))))
            elif macro in _ROFF_ALT_MACROS and rest:
                out.append(_roff_inline("".join(_roff_args(rest))))
            continue
        out.append(_roff_inline(line))
    return tidy("\n".join(out))


# ---- dictd dictionaries -----------------------------------------------------------------------
_DICTD_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def dictd_number(code: str) -> int:
    """Decode a dictd index number (base64 digits, most significant first): `BA` -> 64."""
    value = 0
    for ch in code:
        value = value * 64 + _DICTD_B64[ch]
    return value


def dictd_entries(index_text: str, dict_bytes: bytes) -> list[str]:
    """Unique entries of a dictd dictionary in file order (many headwords share one entry).

    `dict_bytes` is the uncompressed `.dict` (dictzip is gzip-compatible); `00database*`
    pseudo-entries (dictionary metadata) are skipped.
    """
    spans = set()
    for line in index_text.split("\n"):
        fields = line.split("\t")
        if len(fields) < 3 or fields[0].startswith("00database") or fields[0].startswith("00-database"):
            continue
        spans.add((dictd_number(fields[1]), dictd_number(fields[2])))
    return [decode(dict_bytes[off:off + length]).strip() for off, length in sorted(spans)]


def read_gz_or_plain(path: str) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


# ---- R serialization (lazy-load data) ---------------------------------------------------------
class _RReader:
    """The subset of R's XDR serialization that data vectors use (no closures, no environments)."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def read_int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def read(self):
        if self.data[:2] != b"X\n":
            raise ValueError("not an R XDR serialization")
        self.pos = 2
        version = self.read_int()
        self.read_int(), self.read_int()
        if version == 3:
            name_length = self.read_int()  # native encoding name: length, then its bytes
            self.pos += name_length
        return self.item()

    def item(self):
        flags = self.read_int()
        kind, has_attr, has_tag = flags & 0xFF, flags & 0x200, flags & 0x400
        if kind in (242, 251, 253, 254):  # empty env, missing arg, global env, NULL
            return None
        if kind == 255:
            return self.refs[(flags >> 8) - 1]
        if kind == 1:  # symbol
            value = self.item()
            self.refs.append(value)
            return value
        if kind == 9:  # CHARSXP
            length = self.read_int()
            if length == -1:
                return None
            value = self.data[self.pos:self.pos + length].decode("utf-8", errors="replace")
            self.pos += length
            return value
        if kind == 2:  # pairlist -> list of (tag, value)
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            head = self.item()
            tail = self.item() or []
            return [(tag, head)] + tail
        length = self.read_int()
        if kind in (16, 19, 20):  # character vector, list, expression
            value = [self.item() for _ in range(length)]
        elif kind in (10, 13):  # logical, integer
            value = list(struct.unpack_from(f">{length}i", self.data, self.pos))
            self.pos += 4 * length
        elif kind == 14:  # double
            value = list(struct.unpack_from(f">{length}d", self.data, self.pos))
            self.pos += 8 * length
        else:
            raise ValueError(f"unsupported R type {kind}")
        if has_attr:
            attrs = dict(self.item())
            if kind == 19 and "names" in attrs:
                return dict(zip(attrs["names"], value))
        return value


def r_unserialize(data: bytes):
    """R object from its XDR serialization: vectors as lists, named lists as dicts."""
    return _RReader(data).read()


def r_lazyload(rdx: bytes, rdb: bytes) -> dict:
    """{name: object} of an R lazy-load database (`Rdata.rdx` + `Rdata.rdb`, as in a package's data/)."""
    index = r_unserialize(zlib.decompress(rdx[4:]) if rdx[:2] != b"\x1f\x8b" else gzip.decompress(rdx))
    compressed = (index.get("compressed") or [1])[0]
    out = {}
    for name, (offset, length) in index["variables"].items():
        chunk = rdb[offset:offset + length]
        if compressed in (2, 3):  # 4-byte length, a type byte, then the payload
            kind, payload = chunk[4:5], chunk[5:]
            data = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress,
                    b"0": bytes}[kind](payload)
        else:
            data = zlib.decompress(chunk[4:])
        out[name] = r_unserialize(data)
    return out
