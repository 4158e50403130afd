"""MkDocs hook: make the rendered docstrings read well on the site.

The docstrings use two conventions that are not Markdown: Sphinx roles (``:func:`name```) and
references to sections of the project's internal specification ("THEORY §4.2"), which is not part
of the repository. On the site a role becomes plain code and a section reference becomes a link to
the Concepts section (or the Gallery) that states the same thing. Without such text in a page the
hook changes nothing.

Only ``deepufm.analysis`` still cites the specification (tests/test_docs.py checks that no other
user-facing file does); the rest of the package cites the Concepts page or the paper directly.
"""

from __future__ import annotations

import re

# specification section -> (page, anchor, label) of the site
SECTIONS = {
    "1": ("concepts", "deep-unconstrained-feature-models", "deep UFMs"),
    "2": ("concepts", "the-curvature-matrices", "vec convention"),
    "3": ("concepts", "deep-unconstrained-feature-models", "deep UFMs"),
    "4": ("concepts", "deep-neural-collapse", "deep neural collapse"),
    "5": ("concepts", "the-curvature-matrices", "the matrices"),
    "M": ("concepts", "the-curvature-matrices", "the matrices"),
    "6": ("concepts", "predictions-at-the-optimum-linear-mse", "predictions"),
    "7": ("concepts", "where-the-code-departs-from-or-goes-beyond-the-paper", "ReLU UFM"),
    "8": ("concepts", "where-the-code-departs-from-or-goes-beyond-the-paper", "cross-entropy"),
    "9": ("concepts", "the-metrics", "metrics"),
    "10": ("gallery", "", "experiments"),
    "11": ("concepts", "predictions-at-the-optimum-linear-mse", "predictions"),
    "12": ("concepts", "predictions-at-the-optimum-linear-mse", "predictions"),
}
ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):(<code>)~?")
# "THEORY §4.2", "THEORY M3", "THEORY §5, M2", "THEORY §6, §7, §8"
REFERENCE = re.compile(r"THEORY ((?:§\d+(?:\.\d+)?|M\d+)(?:,? (?:§\d+(?:\.\d+)?|M\d+))*)")
PART = re.compile(r"§(\d+)(?:\.\d+)?|M\d+")


def _link(part: str, root: str) -> str:
    m = PART.fullmatch(part)
    key = m.group(1).split(".")[0] if m and m.group(1) else "M"
    page, anchor, label = SECTIONS.get(key, SECTIONS["5"])
    return f'<a href="{root}{page}/{"#" + anchor if anchor else ""}">{label}</a>'


def on_page_content(html: str, page, config, files) -> str:
    root = "../" * page.url.count("/")  # directory URLs: "api/matrices/" -> "../../"
    html = ROLE.sub(r"\1", html)

    def references(m: re.Match) -> str:
        parts = re.split(r",? ", m.group(1))
        links = []
        for part in parts:
            link = _link(part, root)
            if link not in links:
                links.append(link)
        return "see " + ", ".join(links)

    html = REFERENCE.sub(references, html)
    # what is left is a bare mention ("THEORY defines only the MSE form"): the paper's statement
    return re.sub(r"\bTHEORY\b", "the paper", html)
