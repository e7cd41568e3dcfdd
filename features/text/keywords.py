"""Product keywords for SANCL probe masks (REFERENCE.md section 7) and how a review token matches.

English, `script` mode (SANCL's `scripts/generate_mask/gen_amazon.py`, rule for rule): the whole
product name is parsed with the English pipeline; the keyword is the lowercased lemma of the
name's first dependency root (the first token that is its own head). Nothing else: no
comma-segment trimming, no noun fallback ("Stainless Steel Frying Pan" -> "fry" when the
parser makes "Frying" the root; the script would have done the same with that parse).

English, `paper` mode (Algorithm 1: `P^ <- Lemmatise(P); T <- DependencyParse(P^);
W <- FindWordsNearRoot(T)`, and the text: "looking up its dependency tree and picking the
lemmatized form of the words around the root"). The reading taken: the name is parsed and the
lemmas of the words are read off the parse (the parser needs the surface forms; parsing a
string of lemmas, the other reading, gives it ungrammatical input). The paper does not say how
a name is parsed nor which words near the root count; this project's choices:
- only the name's first comma-separated segment holding a letter is parsed, terminated by
  "." (what follows a comma lists attributes, "..., 2 Quart"; the final period keeps the small
  parser from reading title-cased names as a verb phrase);
- a leading gerund/participle root ("Running Shoes", "Folding Chair") is replaced by its first
  noun dependent to the right (a name is a noun phrase);
- core words W = the nouns and proper nouns within `near_root` dependency arcs of the root (the
  root included when it is one); possessors ("Men's", "Levi's") and what hangs below them name
  another entity and are skipped.
The words are lemmas, lowercased (for title-cased names tagged PROPN the lemma is the surface
form; a token then also matches through the *noun* lemma of its lowercased text, so "Shoes"
matches "shoe").

Indonesian (both modes; no parser exists for it, `spacy.blank("id")`): Indonesian noun phrases
are head-initial, so the keyword is the *head noun* of the name: its first word found in the
product-noun lexicon `ID_PRODUCT_NOUNS` (clitics stripped), skipping brand-like words: the
product's own brand words when the caller passes them, and capitalised words found in no
lexicon (`ID_PRODUCT_NOUNS`, `ID_MODIFIERS`, spaCy's Indonesian stop words). With no lexicon
noun, the first word that is neither brand-like nor a modifier (a lowercase unknown word); with
none of those either, the first content word (the rule used is recorded in the meta). `paper`
mode adds the lexicon nouns among the `near_root` words
that follow the head (its dependents in a head-initial phrase). The released script parsed
Indonesian names with the *English* pipeline; that rule is not reproduced (it picks brands and
model numbers: the fault this rule fixes).

Matching a review token against the keywords:
- `word` test: the token's lowercased text or lemma equals a keyword form (lemma, lowercased
  text, noun lemma); Indonesian also strips the clitics -nya, -lah, -kah, -pun (and a particle
  after -nya: "bajunyalah") when the remaining stem keeps at least 3 letters, and reads a
  reduplicated "baju-baju" as "baju". "pan" never matches "Japan".
- `substring` test (script mode's default, what gen_amazon.py does): the keyword is a substring
  of the sentence as the script saw it, its lowercased tokens joined by single spaces ("pan"
  matches "japan", "set" matches "settle").
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

ALPHA_POS = {"NOUN", "PROPN"}
ID_CLITICS = ("nya", "lah", "kah", "pun")
ID_MIN_STEM = 3

# Head nouns of Indonesian e-commerce product names (Lazada's clothing, electronics and home
# categories), with the English loanwords these names use. Lowercase.
ID_PRODUCT_NOUNS = frozenset("""
baju kaos kaus kemeja blus blouse atasan bawahan celana rok gaun dress jaket jas sweater hoodie
kardigan cardigan rompi mantel piyama daster gamis tunik kebaya kulot legging jeans jegging
seragam kostum setelan singlet kutang bra bh beha pakaian busana sarung kerudung jilbab hijab
pashmina mukena peci topi kupluk syal selendang sabuk dasi sepatu
sandal sendal sneakers sneaker sepatu boots boot selop slop sandal tas ransel dompet koper
clutch totebag backpack jam arloji gelang kalung cincin anting bros kacamata masker handuk
bikini
hp handphone ponsel smartphone ponsel telepon tablet laptop notebook komputer monitor layar
keyboard mouse printer kamera lensa tripod speaker headset headphone earphone earbuds tws
charger pengisi kabel adaptor adapter powerbank baterai batre casing case softcase hardcase
pelindung tempered antigores memori memory flashdisk harddisk ssd router modem antena remote
televisi tv radio senter lampu bohlam kipas blender mixer cooker magicom penanak setrika
strika dispenser kulkas lemari freezer microwave oven kompor pemanggang toaster juicer
vacuum penyedot pengering hairdryer catokan catok alat trimmer timbangan
smartwatch smartband konsol joystick gamepad stik drone proyektor stabilizer gimbal
piring mangkok mangkuk gelas cangkir mug sendok garpu pisau talenan panci wajan teflon
penggorengan dandang kukusan baskom ember toples wadah kotak tempat rak keranjang gantungan
hanger sapu pel kasur bantal guling sprei seprai selimut bedcover sarung gorden
gorden tirai karpet keset tikar sofa kursi meja lemari cermin jam vas pot botol tumbler
termos teko ceret saringan spatula sutil centong parutan cetakan loyang nampan rantang
sikat spons sabun deterjen pengharum lilin stiker wallpaper tenda payung
""".split())

# Common Indonesian (and English) modifiers in product names: known words, never brands.
ID_MODIFIERS = frozenset("""
pria wanita cowok cewek laki perempuan anak anakanak bayi balita dewasa remaja unisex dan
hitam putih merah biru hijau kuning abu coklat cokelat pink ungu oranye orange navy maroon
cream krem silver emas gold tosca mocca army motif polos garis kotak bunga batik
besar kecil sedang jumbo mini panjang pendek lebar tinggi tebal tipis ringan berat
katun kulit kayu plastik besi baja stainless kaca keramik aluminium bambu rotan kain wol
murah premium original ori asli baru terbaru lengkap import lokal termurah bagus
grosir paket isi set pcs lusin pasang buah ukuran warna model tipe seri edisi gratis promo
elegan casual kasual formal sport olahraga fashion korea korean style slim fit oversize
muslim muslimah hamil menyusui rumah dapur kamar mandi tidur makan kantor sekolah outdoor
anti lengket tahan air waterproof portable portabel wireless bluetooth digital elektrik listrik
otomatis manual fast charging usb type micro lightning
men women kids girl boy baby new
""".split())


@dataclass(frozen=True)
class Keywords:
    """The keyword(s) of one product name and every surface form that counts as a match."""

    words: tuple[str, ...]  # the keywords, lowercased, in name order (empty: none found)
    forms: frozenset[str]  # lowercased forms a token's text or lemma may equal
    rule: str  # how they were found, for the record meta
    reason: str | None = None  # why there is none
    clitics: bool = False  # Indonesian: strip -nya/-lah/-kah/-pun before comparing

    def __bool__(self) -> bool:
        return bool(self.words)

    def matches(self, token: Any) -> bool:
        """Word-level test of one review token (see the module docstring)."""
        return self.matches_text(token.lower_) or token.lemma_.lower() in self.forms

    def matches_text(self, lower: str) -> bool:
        if lower in self.forms:
            return True
        if not self.clitics:
            return False
        if "-" in lower:  # reduplication: "baju-baju" (spaCy keeps it whole in some contexts)
            parts = lower.split("-")
            if len(parts) == 2 and strip_clitics(parts[0]) == strip_clitics(parts[1]):
                return strip_clitics(parts[0]) in self.forms
        return strip_clitics(lower) in self.forms

    def in_sentence(self, sentence: str) -> bool:
        """gen_amazon.py's test: a keyword is a substring of the lowercased, space-joined sentence."""
        return any(w in sentence for w in self.words)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"keywords": list(self.words), "keyword_rule": self.rule}
        if self.reason:
            out["keyword_reason"] = self.reason
        return out


def strip_clitics(word: str) -> str:
    """An Indonesian word without its enclitics: a particle (-lah, -kah, -pun), then -nya
    ("celananya" -> "celana", "bajunyalah" -> "baju"); a strip leaving fewer than 3 letters
    is not made ("punya", "hanya" stay)."""
    for suffixes in (("lah", "kah", "pun"), ("nya",)):
        for suf in suffixes:
            if word.endswith(suf) and len(word) - len(suf) >= ID_MIN_STEM:
                word = word[: -len(suf)]
                break
    return word


def name_head(name: str) -> str:
    """The part of a product name that paper mode parses: its first comma segment with a letter."""
    for part in name.split(","):
        if has_alpha(part):
            return part.strip()
    return name.strip()


def name_text(name: str, mode: str = "paper") -> str:
    """The text parsed for a product name: script mode the name as is (gen_amazon.py); paper
    mode its head segment terminated as a sentence."""
    if mode == "script":
        return name
    head = name_head(name)
    return f"{head}." if head else ""


def has_alpha(text: str) -> bool:
    return any(c.isalpha() for c in text)


def script_keywords(doc: Any, noun_lemma: Any = None) -> Keywords:
    """gen_amazon.py's `find_root`: the lowercased lemma of the first token that is its own head."""
    for t in doc:
        if t.head.i == t.i and not t.is_space:
            word = t.lemma_.lower()
            if not word.strip():
                break
            return Keywords((word,), frozenset({word, *_forms(t, noun_lemma)}), "script-root-lemma")
    return Keywords((), frozenset(), "script-root-lemma", reason="empty product name")


def english_keywords(doc: Any, name_len: int, *, mode: str, near_root: int, noun_lemma: Any = None) -> Keywords:
    """Keywords from the parse of `name_text(name, mode)`; `name_len` = len(name_head(name)) in
    characters (paper mode: the tokens starting before it are the name's)."""
    if mode == "script":
        return script_keywords(doc, noun_lemma)
    tokens = [t for t in doc if t.idx < name_len and not t.is_space]
    if not tokens:
        return Keywords((), frozenset(), "paper-near-root", reason="empty product name")
    span_end = tokens[-1].i + 1
    roots = [t for t in tokens if (t.head.i == t.i or t.head.i >= span_end) and has_alpha(t.text)]
    if not roots:
        return Keywords((), frozenset(), "paper-near-root", reason="product name has no word")
    root = roots[0]
    if root.pos_ == "VERB" and root.tag_ in ("VBG", "VBN"):
        nouns = [c for c in root.rights if c.i < span_end and c.pos_ in ALPHA_POS]
        root = nouns[0] if nouns else root
    depth = _depths(root, span_end)
    chosen = [
        t for t in tokens
        if t.i in depth and depth[t.i] <= near_root and t.pos_ in ALPHA_POS and has_alpha(t.text)
    ]
    if not chosen:
        return Keywords(
            (), frozenset(), "paper-near-root",
            reason=f"no noun within {near_root} arc(s) of the root {root.text!r} of the product name",
        )
    words, forms = [], set()
    for t in chosen:
        words.append(t.lemma_.lower())
        forms.update(_forms(t, noun_lemma))
    return Keywords(tuple(dict.fromkeys(words)), frozenset(forms), "paper-near-root")


def indonesian_keywords(
    doc: Any, *, mode: str, near_root: int, brands: Iterable[str] = (), stop_words: Iterable[str] | None = None,
) -> Keywords:
    """The head noun of an Indonesian product name (module docstring); `brands`: the product's
    brand name(s), whose words are never the keyword."""
    stop = _id_stop_words() if stop_words is None else frozenset(stop_words)
    brand_words = {w.lower() for b in brands for w in str(b).split() if w}
    words = [t for t in doc if t.is_alpha and len(t.text) >= 2 and t.lower_ not in stop]
    if not words:
        return Keywords((), frozenset(), "id-head-noun", reason="product name has no content word", clitics=True)

    def known(t: Any) -> bool:
        w = strip_clitics(t.lower_)
        return w in ID_PRODUCT_NOUNS or w in ID_MODIFIERS or t.lower_ in ID_MODIFIERS

    def brand_like(t: Any) -> bool:
        return t.lower_ in brand_words or (t.text[:1].isupper() and not known(t))

    def noun(t: Any) -> bool:
        return t.lower_ not in brand_words and strip_clitics(t.lower_) in ID_PRODUCT_NOUNS

    def modifier(t: Any) -> bool:
        return t.lower_ in ID_MODIFIERS or strip_clitics(t.lower_) in ID_MODIFIERS

    head, rule = next((i for i, t in enumerate(words) if noun(t)), None), "id-head-noun"
    if head is None:  # no lexicon noun: a word that is neither brand-like nor a modifier
        rule = "id-first-unknown-word (no lexicon noun)"
        head = next((i for i, t in enumerate(words) if not brand_like(t) and not modifier(t)), None)
    if head is None:
        rule = "id-first-word (no lexicon noun; every word a brand or a modifier)"
        head = next((i for i, t in enumerate(words) if t.lower_ not in brand_words), 0)
    chosen = [words[head]]
    if mode == "paper":
        chosen += [t for t in words[head + 1: head + 1 + near_root] if noun(t)]
    kws = tuple(dict.fromkeys(strip_clitics(t.lower_) for t in chosen))
    return Keywords(kws, frozenset(kws), rule, clitics=True)


def _id_stop_words() -> frozenset[str]:
    from spacy.lang.id.stop_words import STOP_WORDS

    return frozenset(STOP_WORDS)


def _depths(root: Any, span_end: int) -> dict[int, int]:
    """Dependency distance from the root of every token in the name below it."""
    out = {root.i: 0}
    frontier = [root]
    while frontier:
        nxt = []
        for t in frontier:
            for c in t.children:
                if c.i < span_end and c.i not in out and c.dep_ != "poss":
                    out[c.i] = out[t.i] + 1
                    nxt.append(c)
        frontier = nxt
    return out


def _forms(token: Any, noun_lemma: Any) -> Iterable[str]:
    forms = {token.lower_, token.lemma_.lower()}
    if noun_lemma is not None and token.pos_ in ALPHA_POS:
        forms.update(noun_lemma(token.lower_))
    return {f for f in forms if f}
