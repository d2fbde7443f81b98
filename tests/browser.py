"""The MLflow UI as a person sees it: a page rendered by headless Chromium (Debian's `chromium`,
which `make test` installs when it is missing), reduced to its visible text."""

import html
import re
import shutil
import subprocess

import pytest


def chromium() -> str:
    """The browser (`make test` installs Debian's chromium when it is missing)."""
    found = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if not found:
        pytest.fail("no chromium on PATH: `make test` installs it (apt-get install chromium), or install it yourself")
    return found


def page_text(url: str, *, expect: tuple[str, ...] = (), budget_ms: int = 30000, tries: int = 3) -> str:
    """The rendered page's text (scripts and styles dropped, elements separated by ' | '). The
    UI fills its tables and charts from API calls after the page loads; a render that lacks one
    of the ``expect`` strings is tried again (up to ``tries``) before the text is returned."""
    for _ in range(tries):
        p = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                            f"--virtual-time-budget={budget_ms}", "--window-size=1600,1000", "--dump-dom", url],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        body = re.sub(r"<script.*?</script>|<style.*?</style>", "", p.stdout, flags=re.S)
        text = re.sub(r"(\s*\|\s*)+", " | ", html.unescape(re.sub(r"<[^>]+>", " | ", body)))
        if all(e in text for e in expect):
            break
    return text
