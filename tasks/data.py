"""Word lists and templates the tasks draw from (our own wording; pools are filtered per tokenizer at use).

Every pool here is a candidate list: a task keeps only the entries that are a single token (with the
leading space) for the tokenizer at hand and reports how many it dropped.
"""

from __future__ import annotations

# --------------------------------------------------------------------------------------------- IOI
# Common English first names (candidates; a tokenizer typically keeps a subset as single tokens).
IOI_NAMES: tuple[str, ...] = (
    "Mary", "John", "James", "Robert", "Michael", "William", "David", "Richard", "Joseph", "Thomas",
    "Charles", "Daniel", "Matthew", "Anthony", "Mark", "Paul", "Steven", "Andrew", "Kevin", "Brian",
    "George", "Edward", "Ryan", "Jacob", "Gary", "Eric", "Jonathan", "Stephen", "Larry", "Justin",
    "Scott", "Frank", "Benjamin", "Gregory", "Samuel", "Patrick", "Alexander", "Jack", "Dennis", "Jerry",
    "Tyler", "Aaron", "Henry", "Adam", "Peter", "Nathan", "Zachary", "Kyle", "Walter", "Harold",
    "Jeremy", "Ethan", "Carl", "Keith", "Roger", "Arthur", "Lawrence", "Albert", "Joe", "Juan",
    "Sean", "Austin", "Louis", "Philip", "Bobby", "Johnny", "Patricia", "Jennifer", "Linda", "Elizabeth",
    "Barbara", "Susan", "Jessica", "Sarah", "Karen", "Lisa", "Nancy", "Betty", "Margaret", "Sandra",
    "Ashley", "Emily", "Donna", "Michelle", "Carol", "Amanda", "Melissa", "Deborah", "Stephanie", "Rebecca",
    "Laura", "Sharon", "Cynthia", "Kathleen", "Amy", "Angela", "Anna", "Emma", "Helen", "Rachel",
    "Catherine", "Maria", "Heather", "Diane", "Julie", "Joyce", "Victoria", "Kelly", "Christina", "Lauren",
    "Joan", "Evelyn", "Olivia", "Judith", "Megan", "Cheryl", "Martha", "Andrea", "Hannah", "Jacqueline",
    "Grace", "Alice", "Rose", "Sophia", "Lucy", "Kate", "Tom", "Alex", "Sam", "Max", "Ben", "Dan",
    "Tim", "Jim", "Bob", "Mike", "Chris", "Nick", "Jane", "Sally", "Jason", "Jeff", "Simon", "Oliver",
)

IOI_PLACES: tuple[str, ...] = (
    "store", "garden", "restaurant", "school", "hospital", "office", "house", "station", "park", "market",
    "library", "museum", "beach", "church", "bank", "kitchen", "airport", "theater", "hotel", "farm",
)

IOI_OBJECTS: tuple[str, ...] = (
    "ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack", "book", "ball",
    "letter", "bottle", "key", "gift", "phone", "flower", "cake", "pen", "hat", "coin",
)

# The IOI sentence shapes, written in the BABA order ({S} ... {IO} ... {S} ... to); the ABBA variant of a
# template swaps the first {S} and {IO}. Slots: {S}, {IO}, {PLACE}, {OBJECT}. A template ends right
# before the indirect object, which is the answer. These restate the kind of sentence Wang et al. (2022)
# used (two people meet at a place, one of them passes an object to the other) in our own words.
IOI_BABA_TEMPLATES: tuple[str, ...] = (
    "Then {S} and {IO} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Then {S} and {IO} talked at the {PLACE}. {S} handed a {OBJECT} to",
    "After {S} and {IO} arrived at the {PLACE}, {S} gave a {OBJECT} to",
    "When {S} and {IO} got to the {PLACE}, {S} passed a {OBJECT} to",
    "While {S} and {IO} were at the {PLACE}, {S} gave a {OBJECT} to",
    "Later {S} and {IO} walked to the {PLACE}. {S} offered a {OBJECT} to",
    "Earlier {S} and {IO} met at the {PLACE}. {S} gave a {OBJECT} to",
    "Once {S} and {IO} had reached the {PLACE}, {S} handed the {OBJECT} to",
    "Then {S} and {IO} stayed at the {PLACE}. {S} sent a {OBJECT} to",
    "Soon {S} and {IO} went to the {PLACE}. {S} sold a {OBJECT} to",
    "When {S} and {IO} were leaving the {PLACE}, {S} threw a {OBJECT} to",
    "Today {S} and {IO} worked at the {PLACE}. {S} brought a {OBJECT} to",
    "Then {S} and {IO} ate at the {PLACE}. {S} gave a {OBJECT} to",
    "Then {S} and {IO} played at the {PLACE}. {S} gave the {OBJECT} to",
    "After {S} and {IO} had cleaned the {PLACE}, {S} showed a {OBJECT} to",
)

# The 15 BABA templates of the IOI dataset of Wang et al. (2022, arXiv 2211.00593), in our slot syntax
# ({S} = their B, {IO} = their A), each ending right before the final IO mention (the answer). They have
# different token lengths; the IOI task uses all of them (padded batches). Two mention no place or object,
# one names the object twice.
IOI_WANG_BABA_TEMPLATES: tuple[str, ...] = (
    "Then, {S} and {IO} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Then, {S} and {IO} had a lot of fun at the {PLACE}. {S} gave a {OBJECT} to",
    "Then, {S} and {IO} were working at the {PLACE}. {S} decided to give a {OBJECT} to",
    "Then, {S} and {IO} were thinking about going to the {PLACE}. {S} wanted to give a {OBJECT} to",
    "Then, {S} and {IO} had a long argument, and afterwards {S} said to",
    "After {S} and {IO} went to the {PLACE}, {S} gave a {OBJECT} to",
    "When {S} and {IO} got a {OBJECT} at the {PLACE}, {S} decided to give it to",
    "When {S} and {IO} got a {OBJECT} at the {PLACE}, {S} decided to give the {OBJECT} to",
    "While {S} and {IO} were working at the {PLACE}, {S} gave a {OBJECT} to",
    "While {S} and {IO} were commuting to the {PLACE}, {S} gave a {OBJECT} to",
    "After the lunch, {S} and {IO} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Afterwards, {S} and {IO} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Then, {S} and {IO} had a long argument. Afterwards {S} said to",
    "The {PLACE} {S} and {IO} went to had a {OBJECT}. {S} gave it to",
    "Friends {S} and {IO} found a {OBJECT} at the {PLACE}. {S} gave it to",
)
IOI_TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "wang2022": IOI_WANG_BABA_TEMPLATES,
    "paraphrase": IOI_BABA_TEMPLATES,
}


def abba_from_baba(template: str) -> str:
    """The ABBA variant of a BABA template: the first mentions of the two names swap places."""
    first_s, first_io = template.index("{S}"), template.index("{IO}")
    if not first_s < first_io:
        raise ValueError(f"BABA template must mention {{S}} before {{IO}}: {template!r}")
    return (template[:first_s] + "{IO}" + template[first_s + 3:first_io] + "{S}"
            + template[first_io + 4:])


IOI_ABBA_TEMPLATES: tuple[str, ...] = tuple(abba_from_baba(t) for t in IOI_BABA_TEMPLATES)

# ---------------------------------------------------------------------------------------- capitals
# (country, capital) facts. The answer token is the capital with a leading space.
CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"),
    ("Egypt", "Cairo"), ("Greece", "Athens"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("Poland", "Warsaw"), ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Denmark", "Copenhagen"), ("Finland", "Helsinki"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"),
    ("Thailand", "Bangkok"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Cuba", "Havana"),
    ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Syria", "Damascus"),
    ("Lebanon", "Beirut"), ("Israel", "Jerusalem"), ("India", "Delhi"), ("Pakistan", "Islamabad"),
    ("Afghanistan", "Kabul"), ("Bangladesh", "Dhaka"), ("Nepal", "Kathmandu"), ("Indonesia", "Jakarta"),
    ("Philippines", "Manila"), ("Vietnam", "Hanoi"), ("Malaysia", "Kuala"), ("Australia", "Canberra"),
    ("Canada", "Ottawa"), ("Argentina", "Buenos"), ("Chile", "Santiago"),
    ("Colombia", "Bogota"), ("Venezuela", "Caracas"), ("Brazil", "Brasilia"), ("Ukraine", "Kyiv"),
    ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"),
    ("Czechia", "Prague"), ("Slovakia", "Bratislava"), ("Switzerland", "Bern"), ("Scotland", "Edinburgh"),
    ("Wales", "Cardiff"), ("England", "London"), ("Iceland", "Reykjavik"), ("Estonia", "Tallinn"),
    ("Latvia", "Riga"), ("Lithuania", "Vilnius"), ("Belarus", "Minsk"), ("Georgia", "Tbilisi"),
    ("Armenia", "Yerevan"), ("Ethiopia", "Addis"), ("Nigeria", "Abuja"), ("Ghana", "Accra"),
    ("Senegal", "Dakar"), ("Morocco", "Rabat"), ("Algeria", "Algiers"), ("Tunisia", "Tunis"),
    ("Libya", "Tripoli"), ("Sudan", "Khartoum"), ("Uganda", "Kampala"), ("Zimbabwe", "Harare"),
    ("Angola", "Luanda"), ("Mongolia", "Ulaanbaatar"), ("Korea", "Seoul"), ("Taiwan", "Taipei"),
    ("Qatar", "Doha"), ("Jordan", "Amman"), ("Oman", "Muscat"),
    ("Ecuador", "Quito"), ("Bolivia", "Sucre"), ("Uruguay", "Montevideo"), ("Paraguay", "Asuncion"),
    ("Jamaica", "Kingston"), 
)

# Prompt shapes; each ends right before the capital (the space before {country} belongs to the country token).
CAPITAL_TEMPLATES: tuple[str, ...] = (
    "The capital of {country} is",
    "The capital city of {country} is",
    "The capital of {country} is called",
    "In {country}, the capital is",
)

# ------------------------------------------------------------------------------------ greater-than
# Nouns for "The {noun} lasted from the year 17YY to the year 17" (Hanna et al. 2023, our own list).
GREATER_THAN_NOUNS: tuple[str, ...] = (
    "war", "dynasty", "empire", "reign", "siege", "expedition", "conflict", "rebellion", "campaign",
    "crisis", "revolution", "occupation", "famine", "drought", "voyage", "alliance", "truce", "embargo",
    "pilgrimage", "plague", "struggle", "journey", "partnership", "marriage", "apprenticeship", "blockade",
)
GREATER_THAN_TEMPLATE = "The {noun} lasted from the year 17{YY} to the year 17"
