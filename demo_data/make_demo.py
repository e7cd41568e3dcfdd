"""Regenerate the embedded demo dataset (demo_data/mrhp and demo_data/pictures).

The texts below were written for this project; the photos come from the scikit-image and
scikit-learn wheels (see README.md for attribution). Usage:

    python demo_data/make_demo.py --skimage-data DIR   # DIR = skimage/data from the scikit-image 0.26.0 wheel

Images are resized to at most 320 px on the long side and saved as JPEG quality 85. The review
image of B0DEMOHM05-2 is declared in img_url but deliberately not written, so `mrhp validate`
has a missing image to count.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
CATEGORY = "home"
URL = "https://images.example.com/mrhp-demo/{}.jpg"  # illustrative: the demo ships its images

# product id -> (split, name, description, product images [(source, crop box or None)])
PRODUCTS = {
    "B0DEMOHM01": ("train", "Stoneware Coffee Mug Set of 4, 12 oz",
                   "Glazed stoneware mugs with a wide handle. Microwave and dishwasher safe. "
                   "Each mug holds 12 ounces and the set ships in a gift box.",
                   [("coffee", None)]),
    "B0DEMOHM02": ("train", "Plush Donut Pet Bed for Cats and Small Dogs",
                   "Round calming bed with raised rim and faux fur lining, 20 inch diameter, "
                   "machine washable cover and non-slip bottom.",
                   [("chelsea", None)]),
    "B0DEMOHM03": ("train", "Hand-Blown Glass Bud Vase",
                   "Clear hand-blown glass vase, 8 inches tall with a weighted base, for single "
                   "stems and small bouquets.",
                   [("flower", None)]),
    "B0DEMOHM04": ("train", "Stainless Steel Saucepan with Lid, 2 Quart",
                   "Tri-ply stainless steel saucepan with an aluminum core, tempered glass lid and "
                   "stay-cool handle. Works on induction, gas and electric stoves.",
                   []),
    "B0DEMOHM05": ("dev", "Framed Space Exploration Wall Art, Set of 2",
                   "Two framed prints of NASA and SpaceX photography, 11 x 14 inches, black wood "
                   "frames with hanging hardware included.",
                   [("astronaut", None), ("rocket", None)]),
    "B0DEMOHM06": ("dev", "Canvas Print of a Mountain Temple",
                   "Gallery-wrapped canvas print, 16 x 20 inches, ready to hang, printed with "
                   "fade-resistant inks.",
                   [("china", None)]),
    "B0DEMOHM07": ("test", "Glass French Press Coffee Maker, 34 oz",
                   "Borosilicate glass carafe with a stainless steel four-level filter. Makes "
                   "eight cups of coffee or tea.",
                   [("coffee", (100, 0, 500, 300))]),
    "B0DEMOHM08": ("test", "Self-Watering Ceramic Planter, 6 inch",
                   "Ceramic planter with a hidden water reservoir and cotton wick, drainage "
                   "plug and matching saucer.",
                   [("flower", (0, 0, 427, 320))]),
}

# product id -> list of (votes, review text, review images [(source, crop box)])
REVIEWS = {
    "B0DEMOHM01": [
        (23, "I bought these mugs to replace a mismatched collection and they are exactly what I "
             "wanted. They are heavier than they look in the photos, which I like because they keep "
             "coffee hot for a long time. The glaze has small speckles that make each one a little "
             "different. After three months of daily use and the dishwasher every night, none of "
             "them has chipped or faded.", [("coffee", (0, 0, 300, 300))]),
        (9, "Nice mugs but smaller than I expected. The listing says 12 oz and that is true only if "
            "you fill it to the very brim. Realistically it holds about 10 oz of coffee with room "
            "for milk. Still, it looks great on the shelf.", []),
        (4, "The handle is big enough for my whole hand, which is rare. My husband says it is the "
            "best mug he has owned.", []),
        (2, "Arrived in a nice box, no damage. Good gift.", []),
        (1, "Pretty color.", []),
        (17, "A word of warning about the microwave claim: the mug itself gets very hot, hotter than "
             "the coffee inside it. I burned my fingers the first time. It is fine in the dishwasher "
             "and it looks lovely, but use a potholder if you reheat your drink in it.", []),
        (3, "We use them every day. The glaze is smooth and they stack well in the cupboard.", []),
        (0, "ok", []),
        (6, "One of the four arrived with a hairline crack near the handle. The seller replaced it "
            "within a week without asking for a return, so I am keeping the rating high. The other "
            "three are perfect.", [("coffee", (200, 100, 600, 400))]),
        (1, "Exactly as pictured. Would buy again.", []),
    ],
    "B0DEMOHM02": [
        (31, "My cat ignored this bed for two days and then decided it was hers. Now she sleeps in it "
             "every afternoon and growls at the dog if he gets close. The raised rim is soft enough "
             "that she rests her chin on it. I washed the cover once already and it came out fluffy, "
             "no clumping of the filling.", [("chelsea", (50, 0, 451, 300))]),
        (12, "It is smaller than the pictures suggest. The 20 inch measurement includes the rim, so "
             "the sleeping area is maybe 12 inches. Perfect for a cat, too small for my beagle.", []),
        (5, "Super soft and my kitten loves it. The bottom does not slide on our wood floor.", []),
        (2, "Cute bed, a lot of cat hair sticks to it though.", []),
        (8, "Arrived vacuum packed and flat. Give it a full day to puff up, or put it in the dryer on "
            "low for twenty minutes like I did. After that it looks exactly like the photos.", []),
        (1, "Love it.", []),
        (3, "The cover zipper broke on the second wash. The bed is still usable but I expected "
             "better for the price.", []),
        (19, "We have two older cats with arthritis. They both prefer this bed to the heated one we "
             "bought last winter, I think because the rim supports their backs. It has held up to "
             "daily use for four months. The only complaint is that it smells a bit of chemicals "
             "when new, so air it out before you give it to your pet.", []),
        (1, "Good quality for the money.", []),
        (4, "Color is more grey than beige, but my cat does not care.", []),
    ],
    "B0DEMOHM03": [
        (14, "This vase is lovely for a single rose or a few sprigs of lavender. The glass is thick "
             "and clear, with no bubbles or seams. It has a heavy base so it does not tip over when "
             "the cat brushes past the table.", [("flower", (50, 20, 400, 400))]),
        (2, "Smaller than I thought, but pretty.", []),
        (7, "I ordered three of them for wedding centerpieces. Two were perfect, one had a small "
            "scratch on the rim. They photograph beautifully with candles.", []),
        (1, "Nice.", []),
        (3, "The opening is narrow, so it only works with thin stems. That is what it is designed "
            "for, but check before you buy.", []),
        (5, "Clean and simple. It fits on my windowsill and catches the morning light.", []),
        (0, "Came broken.", []),
        (2, "Good value. Packaged well.", []),
        (10, "I was worried that hand-blown meant uneven, but each one is symmetrical and it stands "
             "perfectly straight. Mine holds about a cup of water, enough for fresh flowers to last "
             "a week if you change it every couple of days.", []),
        (1, "Looks expensive.", []),
    ],
    "B0DEMOHM04": [
        (27, "This saucepan heats evenly on my induction cooktop, with no hot spot in the middle. I "
             "make oatmeal in it every morning and it has not scorched once. The lid fits tightly "
             "and the handle really does stay cool. It cleans up with a soft sponge; for stuck-on "
             "milk a little baking soda brings it back to shiny.", []),
        (6, "Solid pan. The lid rattles a little when the water boils hard.", []),
        (11, "The measurement marks inside the pan are etched, not printed, so they will not wear "
             "off. That is a small thing but it means I do not need a measuring cup for rice.", []),
        (1, "Works well.", []),
        (3, "Heavier than my old pan, which is good for stability but hard for my mother to lift "
             "when it is full.", []),
        (2, "Good size for two people.", []),
        (16, "After a year of use it still looks new. I compared it with a pan that costs three times "
             "as much and honestly could not tell a difference in cooking. The rivets on the handle "
             "collect a bit of grime, which is my only complaint.", []),
        (1, "Great pan.", []),
        (4, "Rainbow stains appeared after the first use. Vinegar removed them.", []),
        (2, "Does the job.", []),
    ],
    "B0DEMOHM05": [
        (13, "The prints are sharp and the colors are rich, especially the blue of the astronaut's "
             "suit. The frames are real wood, not plastic, and they came with sawtooth hangers "
             "already attached. They look great in my son's room.", [("astronaut", (0, 0, 512, 400))]),
        (5, "Frames are fine, but one glass pane arrived cracked. Packaging could be better.", []),
        (9, "My husband works in aerospace and he loved them. The rocket launch print is the "
            "better of the two; it has so much detail in the smoke.", [("rocket", (100, 0, 427, 300))]),
        (1, "Nice art.", []),
        (3, "The matting is slightly off center on one of them.", []),
        (2, "Good gift for a space fan.", []),
        (7, "They are smaller than I pictured, 11 x 14 including the frame. Measure your wall "
            "first. Otherwise excellent quality.", []),
        (1, "Looks good.", []),
        (4, "Hung them in the hallway and everyone asks about them.", []),
        (2, "Fast shipping.", []),
    ],
    "B0DEMOHM06": [
        (8, "The canvas is stretched tight and the corners are folded neatly. The colors are a bit "
            "more saturated than the listing photo, but it still looks natural.", []),
        (2, "Beautiful print.", []),
        (15, "I hung this above the sofa and it changed the whole room. It is lightweight, so a "
             "single nail holds it. Up close you can see some pixelation in the sky, but from a "
             "normal viewing distance it looks like a photograph.", [("china", (0, 0, 400, 427))]),
        (1, "Nice.", []),
        (3, "The hanging wire was loose on arrival; I had to retie it.", []),
        (4, "Good quality canvas, colors true to the picture.", []),
        (1, "As described.", []),
        (6, "Bought it as a reminder of a trip. The detail on the roof tiles is impressive for the "
            "price.", []),
        (2, "Arrived with a small dent in one corner.", []),
        (1, "Happy with it.", []),
    ],
    "B0DEMOHM07": [
        (21, "This French press makes a smooth, full-bodied cup with very little sediment. The "
             "four-level filter is the difference: my old press let grounds through, this one does "
             "not. The glass is thinner than I expected, so I handle it carefully, and it loses heat "
             "quickly; pour the coffee into a carafe if you are not drinking it right away.",
         [("coffee", (300, 50, 600, 400))]),
        (4, "Easy to clean. The plunger moves smoothly.", []),
        (9, "The lid does not lock, so if you tilt it too far while pouring it can slide. Hold the "
            "top with one finger and it is fine.", []),
        (1, "Great coffee.", []),
        (2, "Good size for two mugs.", []),
        (12, "I have used it every day for six months. The filter mesh has started to fray at the "
             "edge, but replacement filters are cheap. It still makes better coffee than our drip "
             "machine did.", []),
        (1, "Love it.", []),
        (3, "It cracked when I poured boiling water straight in on a cold morning. Warm it first.", []),
        (5, "Good value. The markings for cups are helpful.", [("coffee", (0, 150, 250, 400))]),
        (2, "Works as expected.", []),
    ],
    "B0DEMOHM08": [
        (10, "The self-watering reservoir really works. I filled it on Sunday and the soil was still "
             "moist the following Saturday. My basil has never looked better. It is glazed inside "
             "and out, so it does not sweat on the shelf.", [("flower", (100, 0, 427, 320))]),
        (2, "Cute planter.", []),
        (6, "It is smaller than I expected, the 6 inches is the outer diameter. Fine for herbs, too "
            "small for most houseplants.", []),
        (1, "Nice color.", []),
        (4, "The wick was missing from mine. I used a strip of cotton from an old t-shirt and it "
            "works fine.", []),
        (18, "I bought four of these for my office. Two months later every plant is alive, which is "
             "a record for me. The water level is easy to check through the gap between the pot and "
             "the saucer. My only wish is that it came in a larger size.", []),
        (1, "Good.", []),
        (3, "The drainage plug is hard to remove.", []),
        (2, "Looks nice on my windowsill.", []),
        (1, "As pictured.", []),
    ],
}

MISSING = {"B0DEMOHM05-2"}  # review image declared but not shipped (validate counts it)


def _image(source: str, skimage_data: Path):
    from PIL import Image

    if source in ("china", "flower"):
        import sklearn.datasets

        path = Path(sklearn.datasets.__file__).parent / "images" / f"{source}.jpg"
    else:
        ext = "jpg" if source == "rocket" else "png"
        path = skimage_data / f"{source}.{ext}"
    return Image.open(path).convert("RGB")


def _save(img, box, dest: Path) -> None:
    if box is not None:
        img = img.crop(box)
    img = img.copy()
    img.thumbnail((320, 320))
    dest.parent.mkdir(parents=True, exist_ok=True)
    img.save(dest, "JPEG", quality=85)


def _write_table(path: Path, rows: list[dict]) -> None:
    cols = list(rows[0]) if rows else []
    table = {c: {str(i): r[c] for i, r in enumerate(rows)} for c in cols}
    path.write_text(json.dumps(table, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skimage-data", type=Path, required=True)
    args = ap.parse_args()
    raw, pictures = HERE / "mrhp", HERE / "pictures"
    raw.mkdir(exist_ok=True)
    cache: dict = {}
    for split in ("train", "dev", "test"):
        prd, rvw, rel = [], [], []
        for pid, (psplit, name, desc, pimgs) in PRODUCTS.items():
            if psplit != split:
                continue
            urls = [URL.format(f"{pid}_{n}") for n in range(len(pimgs))]
            prd.append({"product_id": pid, "name": name, "img_url": urls, "keyword": "home",
                        "description": desc, "brand_name": "Demo Home"})
            for n, (src, box) in enumerate(pimgs):
                img = cache.setdefault(src, _image(src, args.skimage_data))
                _save(img, box, pictures / split / "prd" / pid / f"pic_{n}_0.jpg")
            for k, (votes, text, rimgs) in enumerate(REVIEWS[pid]):
                rid = f"{pid}-{k}"
                rurls = [URL.format(f"{rid}_{n}") for n in range(len(rimgs))]
                rvw.append({"product_id": pid, "review_id": rid, "content": text, "img_url": rurls,
                            "title": text.split(".")[0][:40], "time": 1_600_000_000 + 86_400 * k})
                rel.append({"product_id": pid, "review_id": rid, "upvotes": votes})
                for n, (src, box) in enumerate(rimgs):
                    if rid in MISSING:
                        continue
                    img = cache.setdefault(src, _image(src, args.skimage_data))
                    _save(img, box, pictures / split / "rvw" / rid / f"pic_{n}_0.jpg")
        _write_table(raw / f"{CATEGORY}.prd.{split}", prd)
        _write_table(raw / f"{CATEGORY}.rvw.{split}", rvw)
        _write_table(raw / f"{CATEGORY}.rel.{split}", rel)


if __name__ == "__main__":
    main()
