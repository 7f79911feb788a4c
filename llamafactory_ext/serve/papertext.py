"""Paper text for `review`: read a PDF (pymupdf) / .txt / .md, and drop the references section.

References rule (simple on purpose): the first line after the first 20% of the text that is only
a references heading ("References", "REFERENCES", "7 References", "## Bibliography", "Literature
cited", optional colon) starts the references. They run until the first appendix heading after
them ("Appendix", "A APPENDIX", "Appendix A: Proofs", "# Appendices", "Supplementary material"),
which is kept with everything after it, or to the end. No such heading: nothing is dropped.
"""

from __future__ import annotations

import re
from pathlib import Path

from llamafactory_ext import UserError

TEXT_SUFFIXES = (".txt", ".md", ".markdown")

_REF_RE = re.compile(
    r"^[ \t]*(?:#{1,6}[ \t]*)?(?:\*\*)?(?:(?:\d{1,2}|[IVX]{1,5})\.?[ \t]+)?"
    r"(?:references|bibliography|literature[ \t]+cited|works[ \t]+cited|reference[ \t]+list)"
    r"(?:\*\*)?[ \t]*:?[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
_APPX_RE = re.compile(
    r"^[ \t]*(?:#{1,6}[ \t]*)?(?:\*\*)?(?:(?:[A-Z]|\d{1,2})\.?[ \t]+)?"
    r"(?:appendix|appendices|supplementary[ \t]+materials?)\b(?P<rest>[^\n]*)$",
    re.IGNORECASE | re.MULTILINE,
)


def _is_appendix_heading(m: re.Match) -> bool:
    """"Appendix", "Appendix A", "Appendix B: Proofs", "A APPENDIX" -- not "Appendix B includes two parts"."""
    line, rest = m.group(0).strip(), m.group("rest").strip().strip("*").strip()
    if len(line) > 80 or line.endswith((".", ",", ";", ")")):
        return False
    rest = re.sub(r"^[A-Z](?:\.\d+)*\b|^\d+(?:\.\d+)*\b", "", rest).strip()  # the appendix label
    rest = rest.lstrip(":.-–— ").strip()
    return not rest or rest[0].isupper() or rest[0].isdigit()


def drop_references(text: str) -> tuple[str, dict]:
    """(text without its references section, what was dropped: {'dropped_chars', 'kept_appendix'})."""
    start = next((m for m in _REF_RE.finditer(text) if m.start() >= 0.2 * len(text)), None)
    if start is None:
        return text, {"dropped_chars": 0, "kept_appendix": False}
    appx = next((m for m in _APPX_RE.finditer(text, start.end()) if _is_appendix_heading(m)), None)
    end = appx.start() if appx else len(text)
    kept = text[:start.start()].rstrip() + ("\n\n" + text[end:].lstrip("\n") if appx else "\n")
    return kept, {"dropped_chars": end - start.start(), "kept_appendix": appx is not None}


def _pdf_text(path: Path) -> str:
    import pymupdf

    pymupdf.TOOLS.mupdf_display_errors(False)
    try:
        doc = pymupdf.open(path, filetype="pdf")
    except pymupdf.EmptyFileError:
        raise UserError(f"{path}: the PDF file is empty (0 bytes)") from None
    except (pymupdf.FileDataError, RuntimeError) as e:
        raise UserError(f"{path}: not a readable PDF (corrupt or not a PDF at all): {e}") from None
    with doc:
        if doc.needs_pass:
            raise UserError(f"{path}: the PDF is password-protected; save an unlocked copy first")
        if doc.page_count == 0:
            raise UserError(f"{path}: the PDF has no pages")
        try:
            pages = [page.get_text("text") for page in doc]
            has_images = any(page.get_images(full=False) for page in doc)
        except (RuntimeError, ValueError) as e:
            raise UserError(f"{path}: the PDF is damaged, text extraction failed: {e}") from None
        n_pages = doc.page_count
    text = "\n".join(pages).replace("\x00", "")
    chars = len("".join(text.split()))
    if chars < 20 * n_pages and has_images:
        raise UserError(f"{path}: no text layer ({chars} characters on {n_pages} page(s), which hold images: a "
                        f"scanned PDF?); run OCR first, e.g. `ocrmypdf {path.name} ocr.pdf`, and review ocr.pdf")
    if chars == 0:
        raise UserError(f"{path}: the PDF has {n_pages} page(s) but no text at all")
    return text


def read_paper(path: str | Path) -> str:
    """The paper's text from a .pdf, .txt or .md file (clear errors for anything unusable)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        text = _pdf_text(path)
    elif suffix in TEXT_SUFFIXES:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
        if not text.strip():
            raise UserError(f"{path}: the file is empty")
    else:
        raise UserError(f"{path}: unsupported file type {suffix or '(none)'!r}; give a .pdf, .txt or .md file")
    text = re.sub(r"\n{3,}", "\n\n", text.replace("\r\n", "\n"))
    return text.strip() + "\n"
