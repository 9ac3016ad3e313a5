"""Hostile: splitting a plain script at pg_dump's headers must cost time linear in the
script, whatever a comment line between statements holds.

plainrehearsal._HEADER ends with `(?:; Tablespace: [^\\n]*)?\\n--\\n`: on a comment line
"-- Name: " followed by k copies of "; Type: ; Schema: ; Owner: ; Tablespace: " (and no
"--" line after it) each of the k candidate ends of the Name group runs `[^\\n]*` to the
end of the line and backs off byte by byte: O(k·L), quadratic in the line. split_at_headers
now joins a run of space before searching it (ff344c2), so the whole line is one text
(the scanner used to hand a long comment line on in pieces of at most ~1 MB): a 2 MB
comment line (a few kB gzipped, kept by keep_schema in the worker's full rehearsal of a
plain upload) costs ~10 minutes of CPU in one C regex call, which no deadline can
interrupt; 10 MB costs hours.

Not a timed assertion on wall time: the split runs in a child process with a CPU
budget (RLIMIT_CPU) some 20-30 times what a linear split of this 2 MB script needs
at most, and about 1/30 of what the current pattern needs."""

from __future__ import annotations

import resource
import subprocess
import sys

CHILD = r"""
from stages.preflight.plainrehearsal import split_plain
line = "--\n-- Name: " + "; Type: ; Schema: ; Owner: ; Tablespace: " * 50_000 + "\nX\n"
script = "--\n-- Name: t; Type: TABLE; Schema: public; Owner: o\n--\n\nCREATE TABLE public.t ();\n" + line
_, objects = split_plain(script, complete=True)
assert [entry.name for entry, _ in objects] == ["t"], objects
print("split")
"""


def _limit_cpu() -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (20, 20))


def test_a_long_comment_line_between_statements_splits_in_linear_time():
    result = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, preexec_fn=_limit_cpu, check=False
    )
    assert result.returncode == 0 and "split" in result.stdout, (result.returncode, result.stderr[-2000:])
