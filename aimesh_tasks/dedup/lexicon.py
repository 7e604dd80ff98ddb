"""Word lists for the semantic-cache guards (pure data): numbers, units, negations,
directional connectors, groups of opposites, relative times and common words."""

from __future__ import annotations

_UNITS_WORDS = ("one two three four five six seven eight nine ten eleven twelve thirteen "
                "fourteen fifteen sixteen seventeen eighteen nineteen").split()
# 'one' is left out: it is a pronoun more often than a number ("which one").
NUMBER_WORDS: dict[str, int] = {w: i + 1 for i, w in enumerate(_UNITS_WORDS) if w != "one"}
NUMBER_WORDS.update({"zero": 0, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
                     "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100,
                     "thousand": 1000, "million": 1_000_000, "dozen": 12})


def _aliases(table: dict[str, str]) -> dict[str, str]:
    """{'km kilometer kilometers': 'km'} -> {'km': 'km', 'kilometer': 'km', ...}."""
    return {alias: unit for names, unit in table.items() for alias in names.split()}


UNITS = _aliases({
    "usd dollar dollars bucks": "usd", "eur euro euros": "eur", "gbp sterling": "gbp",
    "jpy yen": "jpy", "percent pct": "percent", "pound pounds lb lbs": "pound",
    "km kilometer kilometers kilometre kilometres": "km", "mile miles mi": "mile",
    "meter meters metre metres": "m", "cm centimeter centimeters": "cm",
    "mm millimeter millimeters": "mm", "foot feet ft": "ft", "inch inches": "inch",
    "yard yards": "yard", "kg kilogram kilograms kilo kilos": "kg", "gram grams": "g",
    "mg milligram milligrams": "mg", "oz ounce ounces": "oz", "ton tons tonne tonnes": "t",
    "liter liters litre litres": "l", "ml milliliter milliliters millilitre": "ml",
    "gallon gallons gal": "gal", "quart quarts": "qt", "celsius centigrade": "celsius",
    "fahrenheit": "fahrenheit", "kelvin": "kelvin", "kb kilobytes": "kb",
    "mb megabytes megabyte": "mb", "gb gigabytes gigabyte": "gb", "tb terabytes": "tb",
    "mbps": "mbps", "gbps": "gbps", "ghz": "ghz", "mhz": "mhz", "mph": "mph",
    "kmh kph": "kmh", "mps": "mps", "kwh": "kwh", "calorie calories kcal": "kcal",
    "ms millisecond milliseconds": "ms",
})
# Words that are units only right after a number ("5 m", "30 seconds", "3 days").
UNITS_AFTER_NUMBER = _aliases({
    "m": "m", "g": "g", "l": "l", "s sec secs second seconds": "s",
    "min mins minute minutes": "min", "h hr hrs hour hours": "h", "day days": "day",
    "week weeks": "week", "month months": "month", "year years yr yrs": "year",
    "w watt watts": "w", "kw": "kw", "v volt volts": "v", "am": "am", "pm": "pm",
})

NEGATIONS = frozenset("not no never n't without none nothing nobody nowhere neither nor "
                      "cannot except excluding".split())
IRREGULAR_NEGATIONS = {"can't": "can", "won't": "will", "shan't": "shall", "ain't": "is"}
NEGATING_PREFIXES = ("un", "in", "im", "non", "dis", "il", "ir")

# Connector -> class; the word after it (before it, for 'after') is its far end.
CONNECTORS = {"to": "to", "into": "to", "towards": "to", "from": "from", "than": "than",
              "before": "before", "after": "after", "by": "by", "vs": "vs"}
DETERMINERS = frozenset("the a an this that these those my our your his her its their "
                        "some any".split())

# Each group lists classes of words; two texts using disjoint classes of a group clash.
OPPOSITES: tuple[tuple[str, ...], ...] = (
    ("largest biggest greatest maximum max highest most top tallest longest heaviest",
     "smallest minimum min lowest least fewest bottom shortest lightest"),
    ("ascending asc", "descending desc"),
    ("encrypt encrypted encryption encrypting", "decrypt decrypted decryption decrypting"),
    ("encode encoding encoded", "decode decoding decoded"),
    ("compress compressed compression zip", "decompress extract unzip uncompress"),
    ("buy buying bought purchase", "sell selling sold"),
    ("advantages advantage pros benefits upsides", "disadvantages disadvantage cons "
     "drawbacks downsides risks"),
    ("increase increasing raise grow enlarge", "decrease decreasing reduce lower shrink"),
    ("closest nearest", "farthest furthest"),
    ("enable enabled enabling", "disable disabled disabling"),
    ("cheapest cheap cheaper inexpensive", "expensive priciest pricier"),
    ("oldest earliest", "newest latest"),
    ("upload uploading", "download downloading"),
    ("import importing", "export exporting"),
    ("add adding insert", "remove removing delete deleting"),
    ("start starting begin launch", "stop stopping end halt terminate kill"),
    ("open opened", "closed close"),
    ("accept accepting approve approving", "reject rejecting decline declining deny refuse"),
    ("win wins winning", "lose loses losing"),
    ("before", "after"),
    ("above over", "below under"),
    ("hot warm", "cold cool"),
    ("fast faster fastest quick", "slow slower slowest"),
    ("first", "last"),
    ("input", "output"),
    ("send sending", "receive receiving"),
    ("male men boys", "female women girls"),
    ("true", "false"),
    ("left", "right"),
    ("north northern", "south southern", "east eastern", "west western"),
    ("junior", "senior"),
    ("morning", "afternoon", "evening", "night"),
    ("summer", "winter", "spring", "autumn fall"),
    ("profit", "loss"),
    ("credit", "debit"),
    ("deposit", "withdraw withdrawal"),
    ("lend", "borrow"),
    ("push", "pull"),
    ("uppercase", "lowercase"),
    ("inbound incoming", "outbound outgoing"),
    ("causes cause", "consequences effects"),
    ("melting", "boiling"),
)
OPPOSITE_INDEX = {word: (g, c) for g, group in enumerate(OPPOSITES)
                  for c, words in enumerate(group) for word in words.split()}

DEICTIC_DAYS = frozenset("today tonight tomorrow yesterday".split())
TIME_MODIFIERS = {"this": "this", "next": "next", "coming": "next", "last": "last",
                  "previous": "last", "past": "last"}
TIME_PERIODS = frozenset("week month year quarter weekend morning afternoon evening night "
                         "season summer winter spring autumn".split())

# Function words and the verbs agents use to ask: they start sentences, so a capital on
# them is no entity, and swapping one for another keeps the question.
COMMON = frozenset("""
what which who whom whose when where why how is are was were be been do does did can
could would should will shall may might must please give tell show list name write draft
create make generate find search look get fetch return explain describe summarize
summarise translate convert calculate compute define classify extract rewrite fix
correct check review recommend suggest plan outline compose send set book split scale
retry pay sort transfer copy migrate forward port divide subtract rename in on at
for from to of the a an this that these those my our your as if it its there here and or
but so also now then briefly again let help identify compare analyze analyse evaluate
estimate update build run use try keep i me we you he she they us them his her their
with about into by up out over under any some all each every many much more most other
such only own same than too very just need want like would i'd i'm is it's what's
prepare come have has had having does doing done say says said way ways mean means
meaning provide display detail details give quick short brief simple simply please
kindly whats hey hi hello ok okay thanks thank cook bake whether
""".split())
# Nouns among the common words: swapping one of these does change the question.
SWAP_NEUTRAL = COMMON - frozenset("list name set book plan sort check port return display "
                                  "detail details fix run scale split cook bake way ways".split())
