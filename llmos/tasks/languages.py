"""Languages: names and ISO 639-1 codes, detection, and which languages a model was trained on.

- `resolve("French" | "fr" | "FR" | "fr-CA" | "français" | "fra") -> Language`; anything else is an
  LlmosError naming the input and how to write a language.
- `detect(text) -> Language` uses langdetect (a port of Google's language-detection, offline, n-gram
  profiles for 55 languages) with a fixed seed, so the same text always gets the same answer; without
  langdetect installed, a script-and-stopword heuristic covers the common cases.
- `model_languages(llm)` reads what the model's files declare: GGUF `general.languages`, or the
  `language:` list of a Hugging Face folder's model card; a small table covers known families whose
  files say nothing. None means unknown.
- `support_note(llm, source, target)` is the plain sentence the CLI prints when a model was not
  trained for a language pair.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from llmos import store
from llmos.errors import LlmosError

if TYPE_CHECKING:
    from llmos.tasks.chat_model import ChatModel


class Language(NamedTuple):
    code: str  # ISO 639-1
    name: str  # English name


# ISO 639-1 code -> (English name, other names users write: native names, ISO 639-2/3 codes).
LANGUAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "af": ("Afrikaans", ("afr",)),
    "ar": ("Arabic", ("العربية", "ara")),
    "bg": ("Bulgarian", ("български", "bul")),
    "bn": ("Bengali", ("বাংলা", "bangla", "ben")),
    "ca": ("Catalan", ("català", "cat")),
    "cs": ("Czech", ("čeština", "cestina", "ces", "cze")),
    "cy": ("Welsh", ("cymraeg", "cym", "wel")),
    "da": ("Danish", ("dansk", "dan")),
    "de": ("German", ("deutsch", "deu", "ger")),
    "el": ("Greek", ("ελληνικά", "ell", "gre")),
    "en": ("English", ("eng",)),
    "es": ("Spanish", ("español", "espanol", "castellano", "spa")),
    "et": ("Estonian", ("eesti", "est")),
    "eu": ("Basque", ("euskara", "eus", "baq")),
    "fa": ("Persian", ("فارسی", "farsi", "fas", "per")),
    "fi": ("Finnish", ("suomi", "fin")),
    "fr": ("French", ("français", "francais", "fra", "fre")),
    "ga": ("Irish", ("gaeilge", "gle")),
    "gl": ("Galician", ("galego", "glg")),
    "gu": ("Gujarati", ("ગુજરાતી", "guj")),
    "he": ("Hebrew", ("עברית", "heb")),
    "hi": ("Hindi", ("हिन्दी", "हिंदी", "hin")),
    "hr": ("Croatian", ("hrvatski", "hrv")),
    "hu": ("Hungarian", ("magyar", "hun")),
    "id": ("Indonesian", ("bahasa indonesia", "ind")),
    "is": ("Icelandic", ("íslenska", "isl", "ice")),
    "it": ("Italian", ("italiano", "ita")),
    "ja": ("Japanese", ("日本語", "jpn")),
    "kn": ("Kannada", ("ಕನ್ನಡ", "kan")),
    "ko": ("Korean", ("한국어", "kor")),
    "lt": ("Lithuanian", ("lietuvių", "lit")),
    "lv": ("Latvian", ("latviešu", "lav")),
    "mk": ("Macedonian", ("македонски", "mkd", "mac")),
    "ml": ("Malayalam", ("മലയാളം", "mal")),
    "mr": ("Marathi", ("मराठी", "mar")),
    "ms": ("Malay", ("bahasa melayu", "msa", "may")),
    "mt": ("Maltese", ("malti", "mlt")),
    "ne": ("Nepali", ("नेपाली", "nep")),
    "nl": ("Dutch", ("nederlands", "flemish", "nld", "dut")),
    "no": ("Norwegian", ("norsk", "nor", "nb", "nob", "bokmål")),
    "pa": ("Punjabi", ("ਪੰਜਾਬੀ", "pan")),
    "pl": ("Polish", ("polski", "pol")),
    "pt": ("Portuguese", ("português", "portugues", "por")),
    "ro": ("Romanian", ("română", "romana", "ron", "rum")),
    "ru": ("Russian", ("русский", "rus")),
    "sk": ("Slovak", ("slovenčina", "slk", "slo")),
    "sl": ("Slovenian", ("slovenščina", "slovene", "slv")),
    "so": ("Somali", ("soomaali", "som")),
    "sq": ("Albanian", ("shqip", "sqi", "alb")),
    "sr": ("Serbian", ("српски", "srpski", "srp")),
    "sv": ("Swedish", ("svenska", "swe")),
    "sw": ("Swahili", ("kiswahili", "swa")),
    "ta": ("Tamil", ("தமிழ்", "tam")),
    "te": ("Telugu", ("తెలుగు", "tel")),
    "th": ("Thai", ("ไทย", "tha")),
    "tl": ("Tagalog", ("filipino", "tgl", "fil")),
    "tr": ("Turkish", ("türkçe", "turkce", "tur")),
    "uk": ("Ukrainian", ("українська", "ukr")),
    "ur": ("Urdu", ("اردو", "urd")),
    "vi": ("Vietnamese", ("tiếng việt", "tieng viet", "vie")),
    "zh": ("Chinese", ("中文", "汉语", "mandarin", "zho", "chi")),
}

_NAMES: dict[str, str] = {}
for _code, (_name, _aliases) in LANGUAGES.items():
    for _alias in (_code, _name, *_aliases):
        _NAMES[_alias.casefold()] = _code


def language(code: str) -> Language:
    return Language(code, LANGUAGES[code][0])


def resolve(value: str | Language) -> Language:
    """A language from an ISO 639-1/639-2 code, a region tag (pt-BR), or an English or native name."""
    if isinstance(value, Language):
        return value
    if not isinstance(value, str) or not value.strip():
        raise LlmosError(f"a language is needed (a name like French or an ISO 639-1 code like fr), got {value!r}")
    key = " ".join(value.strip().casefold().split())
    code = _NAMES.get(key)
    if code is None and re.fullmatch(r"[a-z]{2,3}[-_][a-z0-9]{2,8}", key):  # fr-CA, zh_Hans, pt-BR
        code = _NAMES.get(re.split(r"[-_]", key)[0])
    if code is None:
        raise LlmosError(
            f"unknown language {value!r}: give an English or native name (French, Deutsch) or an ISO 639-1 code "
            f"({', '.join(sorted(LANGUAGES))})"
        )
    return language(code)


# --- detection ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _langdetect_factory() -> Any | None:
    try:
        from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory
    except ImportError:
        return None
    factory = DetectorFactory()
    factory.load_profile(PROFILES_DIRECTORY)
    factory.seed = 0  # langdetect samples n-grams at random: a fixed seed makes it repeatable
    return factory


def detect(text: str) -> Language:
    """The language `text` is written in; an LlmosError when it has too little text to tell."""
    letters = sum(ch.isalpha() for ch in text)
    if letters < 3:
        raise LlmosError("cannot detect the source language: the text has (almost) no words; name it (--from LANG)")
    factory = _langdetect_factory()
    if factory is not None:
        from langdetect.lang_detect_exception import LangDetectException

        detector = factory.create()
        detector.append(text)
        try:
            code = detector.detect()
        except LangDetectException:
            raise LlmosError("cannot detect the source language of this text; name it (--from LANG)") from None
        code = code.split("-")[0]  # zh-cn, zh-tw
        if code in LANGUAGES:
            return language(code)
    return _heuristic(text)


# Script ranges for languages with a script of their own (first match by letter count wins).
_SCRIPTS: tuple[tuple[str, str], ...] = (
    ("ja", "\u3040-\u30ff"),  # kana: Japanese even when mixed with kanji
    ("ko", "\uac00-\ud7af\u1100-\u11ff"),
    ("zh", "\u4e00-\u9fff"),
    ("ru", "\u0400-\u04ff"),
    ("el", "\u0370-\u03ff"),
    ("he", "\u0590-\u05ff"),
    ("ar", "\u0600-\u06ff"),
    ("hi", "\u0900-\u097f"),
    ("th", "\u0e00-\u0e7f"),
)

_STOPWORDS: dict[str, set[str]] = {
    "en": set("the and of to is in that it for with was on are this be as at by not you have from".split()),
    "fr": set("le la les et des est un une que pour dans du pas sur au qui ce avec il elle nous vous".split()),
    "de": set("der die das und ist nicht ein eine zu den mit von sich des auf für im dem ich sie wir".split()),
    "es": set("el la los las y es en que un una por con para del se no al lo su como más".split()),
    "it": set("il lo la gli le e è di che un una per con non del della sono nel al si".split()),
    "pt": set("o a os as e é de que um uma para com não do da em no na se por mais".split()),
    "nl": set("de het een en is van dat niet in op te zijn met voor die er ook maar".split()),
}


def _heuristic(text: str) -> Language:
    need = max(3, 0.2 * sum(ch.isalpha() for ch in text))
    for code, chars in _SCRIPTS:
        if len(re.findall(f"[{chars}]", text)) >= need:
            return language(code)
    words = re.findall(r"[^\W\d_]+", unicodedata.normalize("NFC", text.casefold()))
    scores = {code: sum(w in stop for w in words) for code, stop in _STOPWORDS.items()}
    best = max(scores, key=scores.get)
    if scores[best] == 0:
        raise LlmosError("cannot detect the source language of this text; name it (--from LANG)")
    return language(best)


# --- what a model was trained on ----------------------------------------------------------------------

# Families whose files may not say: the languages their model cards list.
KNOWN_MODELS: dict[str, tuple[str, ...]] = {
    "smollm2": ("en",),
    "smollm": ("en",),
    "gpt2": ("en",),
    "tinyllama": ("en",),
}


def model_languages(llm: ChatModel) -> tuple[str, ...] | None:
    """ISO codes the model's files say it was trained on, or None when nothing says."""
    path = Path(llm.path)
    source = path if store.kind_of(path) == "gguf" else path / "README.md"  # what is read, and so what a change shows in
    stat = source.stat() if source.exists() else None
    return _declared_languages(str(path), stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0)


@functools.lru_cache(maxsize=16)
def _declared_languages(path_str: str, mtime_ns: int, size: int) -> tuple[str, ...] | None:
    # Reading a GGUF file's metadata parses its whole vocabulary: once per file (and version) is enough.
    path = Path(path_str)
    declared: list[str] = []
    if store.kind_of(path) == "gguf":
        from llmos.weights.gguf import GGUFFile

        with GGUFFile(path) as gguf:
            meta = gguf.metadata
            declared = [str(x) for x in meta.get("general.languages", []) or []]
            family = " ".join(str(meta.get(k, "")) for k in ("general.basename", "general.name")).casefold()
    else:
        declared = _card_languages(path / "README.md")
        family = path.name.casefold()
    codes = []
    for item in declared:
        try:
            codes.append(resolve(item).code)
        except LlmosError:
            continue
    if codes:
        return tuple(dict.fromkeys(codes))
    words = family.replace("-", " ").replace("_", " ")
    for name, langs in KNOWN_MODELS.items():
        if re.search(rf"\b{name}\b", words) or family.startswith(name):
            return langs
    return None


def _card_languages(readme: Path) -> list[str]:
    """The `language:` entry of a model card's YAML front matter (a list or one value)."""
    if not readme.is_file():
        return []
    text = readme.read_text(encoding="utf-8", errors="replace")
    front = re.match(r"---\s*\n(.*?)\n---", text, re.S)
    if not front:
        return []
    lines = front.group(1).splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"language:\s*(.*)$", line)
        if not m:
            continue
        value = m.group(1).strip()
        if value.startswith("["):
            return [v.strip(" '\"") for v in value.strip("[]").split(",") if v.strip()]
        if value:
            return [value.strip("'\"")]
        items = []
        for follow in lines[i + 1:]:
            item = re.match(r"\s*-\s*(.+)$", follow)
            if not item:
                break
            items.append(item.group(1).strip(" '\""))
        return items
    return []


def support_note(llm: ChatModel, source: Language, target: Language) -> str | None:
    """A plain sentence when the model's files say it was not trained on `source` or `target`."""
    langs = model_languages(llm)
    if langs is None:
        return None
    missing = [lang for lang in (source, target) if lang.code not in langs]
    if not missing:
        return None
    trained = ", ".join(f"{language(c).name if c in LANGUAGES else c} ({c})" for c in langs)
    name = Path(llm.path).name
    lacking = " or ".join(dict.fromkeys(lang.name for lang in missing))
    return (f"{name} was trained on {trained} only, not on {lacking}: it was not trained to translate "
            f"{source.name} to {target.name}, so expect a poor translation (choose another model with --model)")
