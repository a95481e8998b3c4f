"""How python-docs-calibration.txt and python-docs-evaluation.txt were made (see README.md).

Reduces the Python documentation's reStructuredText sources to their English prose
(code blocks, doctests, grammar, tables, directives and inline markup removed) and
writes the two disjoint texts. Not used at run time; kept so that the texts can be
rebuilt and audited:

    apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb x
    python clada_export/texts/make_texts.py x/usr/share/doc/python3.11/html/_sources clada_export/texts
"""
import re, sys

PROSE_DIRECTIVES = {"note", "warning", "seealso", "versionadded", "versionchanged", "deprecated",
                    "impl-detail", "attention", "caution", "important", "tip", "hint", "admonition",
                    "topic", "sidebar", "rubric", "epigraph", "danger", "error"}
UNDERLINE = re.compile(r"""^\s*([=\-~^*#+"'`.:_])\1{2,}\s*$""")
DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
COMMENT = re.compile(r"^(\s*)\.\.(\s.*)?$")


def inline(s):
    return s


def indent(line):
    return len(line) - len(line.lstrip(" "))


def _inline(s):
    s = re.sub(r":pep:`(\d+)`", r"PEP \1", s)
    s = re.sub(r":rfc:`(\d+)`", r"RFC \1", s)
    s = re.sub(r":(?:issue|bpo):`(\d+)`", r"bpo-\1", s)
    s = re.sub(r":gh:`(\d+)`", r"gh-\1", s)
    s = re.sub(r":ref:`([\w-]+)`", lambda m: m.group(1).replace("-", " "), s)
    s = re.sub(r":[\w:+-]+:`~?!?([^`<]*?)\s*<[^`>]*>`", r"\1", s)        # :ref:`text <label>`
    s = re.sub(r":[\w:+-]+:`~?!?([^`]*)`", lambda m: m.group(1).split(".")[-1]
               if m.group(0).startswith((":meth:`~", ":func:`~", ":class:`~", ":attr:`~", ":exc:`~",
                                         ":mod:`~", ":data:`~")) else m.group(1), s)
    s = re.sub(r"`([^`<]+?)\s*<[^`>]+>`__?", r"\1", s)                    # `text <url>`_
    s = re.sub(r"``([^`]+)``", r"\1", s)
    s = re.sub(r"`([^`]+)`_{0,2}", r"\1", s)
    s = re.sub(r"\[#\w*\]_|\[\d+\]_", "", s)                               # footnote references
    s = re.sub(r"\*\*(\S(?:.*?\S)?)\*\*", r"\1", s)
    s = re.sub(r"(?<![\w*])\*(\S(?:[^*]*?\S)?)\*(?![\w*])", r"\1", s)
    s = re.sub(r"\|(\w+)\|", r"\1", s)
    s = s.replace("\\ ", "").replace("\\", "")
    return s


def rst_to_prose(text):
    lines = text.expandtabs(8).splitlines()
    out = []
    i, n = 0, len(lines)
    literal_next = False   # the previous paragraph ended with "::"
    while i < n:
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            out.append("")
            i += 1
            continue
        base = indent(line)
        m = DIRECTIVE.match(line)
        if m or COMMENT.match(line) or (literal_next and base > 0) or stripped.startswith(">>>") \
                or stripped.startswith(("+--", "+==")) or (stripped.startswith("|") and "|" in stripped[1:]) \
                or re.match(r"^=+( +=+)+$", stripped):
            keep_body = bool(m) and m.group(2) in PROSE_DIRECTIVES
            if keep_body and m.group(3) and not re.match(r"^[\d.]+$", m.group(3)):
                out.append(inline(m.group(3)))
            # skip the block: following lines that are blank or indented deeper than this one
            block_indent = base if (m or COMMENT.match(line)) else base - 1
            if stripped.startswith(("+--", "+==", ">>>")) or (stripped.startswith("|")) or \
                    re.match(r"^=+( +=+)+$", stripped):
                block_indent = -1   # tables and doctests run until a blank line
            i += 1
            while i < n:
                nxt = lines[i]
                if block_indent < 0:
                    if not nxt.strip():
                        break
                elif nxt.strip() and indent(nxt) <= block_indent:
                    break
                if keep_body and nxt.strip() and not re.match(r"^\s*:\w[\w-]*:", nxt):
                    out.append(inline(nxt.strip()))
                elif keep_body and not nxt.strip():
                    out.append("")
                i += 1
            literal_next = False
            continue
        if UNDERLINE.match(line):
            i += 1
            continue
        literal_next = False
        if stripped.endswith("::"):
            literal_next = True
            stripped = stripped[:-2].rstrip()
            if stripped.endswith(" "):
                stripped = stripped.rstrip()
            if stripped and not stripped.endswith(":"):
                stripped += ":"
            # the literal block starts after a blank line
            out.append(inline(stripped)) if stripped else None
            i += 1
            if i < n and not lines[i].strip():
                out.append("")
                i += 1
            continue
        out.append(inline(stripped))
        i += 1
    text = _inline("\n".join(out))
    text = re.sub(r"(?m)^:[\w-]+:( .*)?$\n?", "", text)   # field lists (:tocdepth: 2)
    text = re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
    return text




CALIBRATION = ["howto/functional", "howto/logging", "howto/regex", "howto/unicode", "howto/sockets",
               "howto/sorting", "howto/descriptor", "howto/enum", "howto/annotations", "howto/pyporting"]
EVALUATION = ["tutorial/appetite", "tutorial/interpreter", "tutorial/introduction", "tutorial/controlflow",
              "tutorial/datastructures", "tutorial/modules", "tutorial/inputoutput", "tutorial/errors",
              "tutorial/classes", "tutorial/stdlib", "tutorial/stdlib2", "tutorial/venv", "tutorial/whatnow",
              "tutorial/interactive", "tutorial/floatingpoint", "tutorial/appendix",
              "faq/general", "faq/programming", "faq/design", "faq/library", "faq/extending",
              "faq/windows", "faq/gui", "faq/installed"]


def build(sources_dir, out_dir):
    import os
    for name, pages in (("calibration", CALIBRATION), ("evaluation", EVALUATION)):
        parts = [rst_to_prose(open(os.path.join(sources_dir, p + ".rst.txt"), encoding="utf-8").read())
                 for p in pages]
        with open(os.path.join(out_dir, f"python-docs-{name}.txt"), "w", encoding="utf-8") as f:
            f.write("\n\n".join(p.strip("\n") for p in parts) + "\n")


if __name__ == "__main__":
    build(sys.argv[1], sys.argv[2])
