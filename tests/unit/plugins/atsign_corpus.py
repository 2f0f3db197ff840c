"""The one corpus of the atSign rule: the runtime's test and the plugins' mirror test both
feed it (it lives here so it ships with the collection's unit tests)."""

from __future__ import annotations

# (input, canonical form or None when it is not an atSign)
CORPUS: list[tuple[str, str | None]] = [
    ("alice", "@alice"), ("@alice", "@alice"), ("@Alice", "@alice"), (" @alice\t", "@alice"),
    ("@colin.constable", "@colinconstable"), ("@np_client", "@np_client"),
    ("@a-b_c9", "@a-b_c9"), ("@alice🛠", "@alice🛠"), ("@🦄", "@🦄"), ("©", "@©"),
    ("@" + "x" * 55, "@" + "x" * 55),
    ("", None), ("@", None), ("@.", None), ("@..", None), ("@@x", None), ("a@b", None),
    ("@a/b", None), ("@a\\b", None), ("@a:b", None), ("@a b", None), ("@a,b", None),
    ("@a\x00", None), ("@a\u2028b", None), ("@é", None), ("@a~b", None), ("@a%b", None),
    ("@" + "x" * 56, None), ("@ali ce", None), ("@a\nb", None), ("@a'b", None),
    ("@a\u2400", None), ("@ⓐ", "@ⓐ"),
]
