"""The web page at `/`: one self-contained HTML file, served with a Content-Security-Policy that allows exactly its
inline script and style (by hash), and nothing else."""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class Page:
    html: str
    headers: dict[str, str]


def load_page() -> Page:
    """page.html and the response headers it is served with."""
    html = resources.files("ctplatform.serve").joinpath("page.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
           "img-src data:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
    return Page(html, {"Content-Security-Policy": csp, "Referrer-Policy": "no-referrer",
                       "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})
