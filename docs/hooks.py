"""MkDocs hook: links from the documentation pages to files of the repository outside docs/.

The pages link to recipes, results files and source files with relative paths
(``../benchmarks/results/parity.md``), which work where the Markdown is read in the repository.
The site holds only docs/, so MkDocs cannot resolve them. This hook checks that each such target
exists in the repository (a missing one is a warning, which fails ``mkdocs build --strict``) and
rewrites the link: to ``repo_url``/blob/main/PATH when mkdocs.yml sets ``repo_url``, otherwise to
the link text followed by the repository path in code, so that no link in the site is broken.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.repo_links")
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)", re.M)


def _rewrite(text: str, page_uri: str, docs_dir: Path, repo: Path, repo_url: str | None) -> str:
    def one(m: re.Match) -> str:
        bang, label, target = m.groups()
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", target):
            return m.group(0)  # absolute URL, anchor or site-absolute path
        path, _, anchor = target.partition("#")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(page_uri), path))
        if not resolved.startswith("../"):
            return m.group(0)  # inside docs/: MkDocs checks it
        repo_path = posixpath.normpath(posixpath.join("docs", resolved))
        if repo_path.startswith("../") or not (repo / repo_path).exists():
            log.warning("Doc file '%s' links to '%s', which is not a file of the repository", page_uri, target)
            return m.group(0)
        if repo_url:
            kind = "tree" if (repo / repo_path).is_dir() else "blob"
            url = f"{repo_url.rstrip('/')}/{kind}/main/{repo_path}" + (f"#{anchor}" if anchor else "")
            return f"{bang}[{label}]({url})"
        return f"{label} (`{repo_path}`)" if label.strip("`") != repo_path.rstrip("/") else f"`{repo_path}`"

    parts = FENCE.split(text)
    # split keeps the fence markers: even chunks outside code blocks, alternating by fence count
    out, inside = [], False
    for chunk in parts:
        if chunk in ("```", "~~~"):
            inside = not inside
            out.append(chunk)
        else:
            out.append(chunk if inside else LINK.sub(one, chunk))
    return "".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    docs_dir = Path(config["docs_dir"]).resolve()
    return _rewrite(markdown, page.file.src_uri, docs_dir, docs_dir.parent, config.get("repo_url"))
