"""The demo's synthetic chat domain: people tell the assistant about themselves, then ask later.

A person has up to eight facts in seven groups (name, city, job, pet kind + pet name, trip, food,
hobby). Every fact value is one word from a fixed list, and the lists are disjoint, so a reply
can be scored by exact match. Facts are told over one or more conversations mixed with small
talk; a later conversation asks about them. `build_demo.py` trains the backbone and the δ
adapter on this data and `benchmarks/recall_eval.py` evaluates on people drawn with other seeds.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

NAMES = ("Ada Omar Lena Hugo Maya Felix Nora Ivan Sofia Leo Clara Mateo Yara Oscar Emma Kenji "
         "Alma Tariq Ines Bruno Zoe Pavel Rosa Amir Julia Theo Mina Diego Freya Ravi Elsa Jonas "
         "Lucia Nikolai Hana Marco Olga Samir Vera Paulo").split()
CITIES = ("Paris Berlin Lisbon Madrid Rome Vienna Prague Oslo Dublin Warsaw Athens Cairo Nairobi "
          "Lagos Tokyo Seoul Hanoi Lima Quito Bogota Denver Boston Chicago Toronto Montreal Sydney "
          "Auckland Mumbai Istanbul Helsinki").split()
JOBS = ("nurse teacher baker pilot plumber lawyer dentist chef farmer architect librarian engineer "
        "painter journalist firefighter pharmacist carpenter musician photographer mechanic "
        "electrician gardener translator accountant veterinarian").split()
PETS = "dog cat rabbit parrot hamster turtle goldfish horse ferret lizard canary hedgehog".split()
PET_NAMES = ("Rex Milo Luna Bella Max Coco Biscuit Pepper Shadow Ziggy Noodle Mochi Pickles Rocky "
             "Daisy Oreo Toby Ginger Peanut Boots Bubbles Socks Nacho Pixel Olive Teddy Maple Juno "
             "Kiwi Smokey").split()
TRIPS = ("Japan Peru Iceland Kenya Norway Mexico Brazil Egypt Greece Canada Chile India Morocco "
         "Vietnam Portugal Scotland Nepal Argentina Thailand Australia").split()
FOODS = ("pizza sushi pasta tacos curry ramen paella dumplings pancakes lasagna falafel burgers "
         "risotto chocolate cheesecake steak omelettes couscous hummus burritos kebab gnocchi "
         "croissants tiramisu enchiladas").split()
HOBBIES = ("chess painting hiking knitting gardening cycling swimming fishing dancing climbing "
           "surfing pottery running singing skiing reading sailing yoga archery juggling").split()

VALUES: dict[str, list[str]] = {
    "name": NAMES, "city": CITIES, "job": JOBS, "pet": PETS, "pet_name": PET_NAMES,
    "trip": TRIPS, "food": FOODS, "hobby": HOBBIES,
}
SLOTS = tuple(VALUES)
# Facts told together: the pet's kind and its name come in one sentence.
GROUPS = (("name",), ("city",), ("job",), ("pet", "pet_name"), ("trip",), ("food",), ("hobby",))


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


TELL = {
    "name": ["My name is {name}.", "I'm {name}, by the way.", "Hi! I am {name}.",
             "You can call me {name}.", "Hello, my name is {name}."],
    "city": ["I live in {city}.", "I moved to {city} last year.", "I am from {city}.",
             "My home is in {city}.", "These days I live in {city}."],
    "job": ["I work as {a_job} {job}.", "I am {a_job} {job}.", "My job? I am {a_job} {job}.",
            "I have been {a_job} {job} for years."],
    "pet": ["I have a {pet} named {pet_name}.", "My {pet} is called {pet_name}.",
            "I just adopted a {pet}. I named it {pet_name}."],
    "trip": ["Next month I am going to {trip}.", "I am planning a trip to {trip}.",
             "This summer I will travel to {trip}.", "I booked a holiday in {trip}."],
    "food": ["My favorite food is {food}.", "I love {food}.", "Nothing beats {food} for dinner.",
             "I could eat {food} every day."],
    "hobby": ["My hobby is {hobby}.", "I really enjoy {hobby}.",
              "On weekends I do a lot of {hobby}.", "Lately I have been into {hobby}."],
}
ACK = {
    "name": ["Nice to meet you, {name}!", "Hello {name}, nice to meet you.",
             "Great to meet you, {name}. How can I help?"],
    "city": ["{city} is a lovely place.", "Oh, I have heard good things about {city}.",
             "Nice, how do you like living there?"],
    "job": ["Being {a_job} {job} sounds interesting.", "That must keep you busy!"],
    "pet": ["{pet_name} sounds adorable!", "A {pet}! How lovely."],
    "trip": ["{trip} sounds exciting! Have a great trip.", "What a nice plan!"],
    "food": ["Good choice, {food} is delicious.", "Yum, I can see why."],
    "hobby": ["{hobby} sounds like fun.", "That is a great way to relax."],
}
GENERIC_ACK = ["Got it, I will remember that.", "Thanks for telling me!", "That sounds great."]
UPDATE = {
    "city": ("Actually, I just moved to {city}.", "Congratulations on the move to {city}!"),
    "job": ("I changed jobs. Now I am {a_job} {job}.", "Good luck in your new job!"),
    "trip": ("Change of plans: I am going to {trip} instead.", "Noted, {trip} it is."),
    "food": ("These days my favorite food is {food}.", "Noted, you like {food} now."),
}
QUESTIONS = {
    "name": ["What is my name?", "Do you remember my name?", "Who am I?",
             "Can you tell me my name?"],
    "city": ["Where do I live?", "Which city do I live in?", "Do you remember where I live?"],
    "job": ["What do I do for a living?", "What is my job?", "Do you remember my job?"],
    "pet": ["What kind of pet do I have?", "What animal do I have at home?"],
    "pet_name": ["What is my pet's name?", "What is my pet called?"],
    "trip": ["Where am I going on my trip?", "Where am I traveling to?"],
    "food": ["What is my favorite food?", "What do I like to eat?"],
    "hobby": ["What is my hobby?", "What do I enjoy in my free time?"],
}
ANSWERS = {
    "name": "Your name is {name}.", "city": "You live in {city}.",
    "job": "You work as {a_job} {job}.", "pet": "You have a {pet}.",
    "pet_name": "Your pet is called {pet_name}.", "trip": "You are going to {trip}.",
    "food": "Your favorite food is {food}.", "hobby": "Your hobby is {hobby}.",
}
SUMMARY_QUESTIONS = ["What do you know about me?", "Tell me everything you remember about me."]
SMALL_TALK = [
    ("How are you today?", "I am doing well, thank you! How about you?"),
    ("What's the weather like?", "I can't see outside, but I hope it is sunny where you are."),
    ("Tell me a joke.",
     "Why did the scarecrow win an award? Because he was outstanding in his field!"),
    ("I had a long day at work.", "Sorry to hear that. Take some time to rest tonight."),
    ("Can you recommend a book?", "You could try a classic novel, or a good mystery."),
    ("Thanks for your help!", "You're welcome! Happy to help."),
    ("Good morning!", "Good morning! What can I do for you?"),
    ("I'm bored.", "Maybe take a short walk or call a friend?"),
    ("What time is it?", "I don't have a clock, but I hope your day is going well."),
    ("Do you like music?", "I enjoy hearing about music. What do you listen to?"),
    ("I feel tired today.", "Make sure to drink some water and get some sleep."),
    ("Goodbye!", "Goodbye! Talk to you soon."),
    ("What should I cook tonight?", "How about something simple with fresh vegetables?"),
    ("Who are you?", "I am a small assistant that remembers what you tell me."),
    ("It is raining again.", "Rainy days are perfect for a cup of tea."),
    ("I have a meeting tomorrow.", "Good luck! I am sure it will go well."),
    ("Can you help me relax?", "Take a deep breath in, and slowly breathe out."),
    ("What is two plus two?", "Two plus two is four."),
    ("I just woke up.", "Good morning! Did you sleep well?"),
    ("Say something nice.", "You are doing better than you think."),
]
SUMMARY_ORDER = SLOTS


@dataclass
class Person:
    """One user's true facts; `told` lists the slots told so far (in telling order)."""

    facts: dict[str, str]
    told: list[str] = field(default_factory=list)

    def fill(self, template: str, facts: dict[str, str] | None = None) -> str:
        f = facts or self.facts
        return template.format(**f, a_job=_a(f["job"]))


def random_person(rng: random.Random) -> Person:
    return Person({slot: rng.choice(values) for slot, values in VALUES.items()})


def answer(person: Person, slot: str) -> str:
    return person.fill(ANSWERS[slot])


def summary(person: Person) -> str:
    """The canonical answer to "What do you know about me?": every told fact, in a fixed order."""
    return " ".join(answer(person, s) for s in SUMMARY_ORDER if s in person.told)


def _group_of(slot: str) -> tuple[str, ...]:
    return next(g for g in GROUPS if slot in g)


def _tell_turn(rng: random.Random, person: Person, groups: list[tuple[str, ...]],
               wrong_acks: float = 0.0) -> list[dict]:
    """A user message telling one or two fact groups, and the assistant's acknowledgement.
    With probability `wrong_acks` the acknowledgement is someone else's (naming their fact, as
    a small model's own acknowledgements often do: the memory must trust what the user said)."""
    sentences = [person.fill(rng.choice(TELL[g[0]])) for g in groups]
    if rng.random() < 0.2:
        sentences.insert(0, rng.choice(["Hi!", "Hello again.", "Guess what?", "So,"]))
    for g in groups:
        person.told.extend(s for s in g if s not in person.told)
    last = groups[-1][0]
    reply = person.fill(rng.choice(ACK[last])) if rng.random() < 0.6 else rng.choice(GENERIC_ACK)
    if wrong_acks and rng.random() < wrong_acks:  # (no draw at 0: older data stay identical)
        other = random_person(rng)
        reply = other.fill(rng.choice(ACK[last]))
    return [{"role": "user", "content": " ".join(sentences)},
            {"role": "assistant", "content": reply}]


def _small_talk(rng: random.Random) -> list[dict]:
    user, assistant = rng.choice(SMALL_TALK)
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _update_turn(rng: random.Random, person: Person) -> list[dict] | None:
    slots = [s for s in UPDATE if s in person.told]
    if not slots:
        return None
    slot = rng.choice(slots)
    choices = [v for v in VALUES[slot] if v != person.facts[slot]]
    person.facts[slot] = rng.choice(choices)
    user, reply = UPDATE[slot]
    return [{"role": "user", "content": person.fill(user)},
            {"role": "assistant", "content": person.fill(reply)}]


def question_turn(rng: random.Random, person: Person, slot: str | None = None) -> list[dict]:
    """Ask about one told fact (or, with slot "summary", about everything)."""
    if slot == "summary":
        return [{"role": "user", "content": rng.choice(SUMMARY_QUESTIONS)},
                {"role": "assistant", "content": summary(person)}]
    slot = slot or rng.choice(person.told)
    return [{"role": "user", "content": rng.choice(QUESTIONS[slot])},
            {"role": "assistant", "content": answer(person, slot)}]


def telling_conversations(rng: random.Random, person: Person, num_groups: int,
                          num_conversations: int, updates: bool = True,
                          only: tuple[str, ...] | None = None,
                          wrong_acks: float = 0.0) -> list[list[dict]]:
    """Conversations telling `num_groups` fact groups (random order), small talk between;
    `only` limits the groups to those holding these slots."""
    pool = GROUPS if only is None else [g for g in GROUPS if set(g) & set(only)]
    groups = rng.sample(pool, min(num_groups, len(pool)))
    num_groups = len(groups)
    # The name is told first when it is told at all: people introduce themselves.
    if ("name",) in groups:
        groups.remove(("name",))
        groups.insert(0, ("name",))
    num_conversations = max(1, min(num_conversations, num_groups))
    cuts = sorted(rng.sample(range(1, num_groups), num_conversations - 1))
    parts = [groups[a:b] for a, b in zip([0, *cuts], [*cuts, num_groups])]
    conversations = []
    for part in parts:
        turns: list[dict] = []
        if rng.random() < 0.4:
            turns += _small_talk(rng)
        i = 0
        while i < len(part):
            take = 2 if i + 1 < len(part) and rng.random() < 0.3 else 1
            turns += _tell_turn(rng, person, part[i:i + take], wrong_acks)
            i += take
            if rng.random() < 0.3:
                turns += _small_talk(rng)
        if conversations and rng.random() < 0.3:  # ask about something told earlier
            turns += question_turn(rng, person)
        conversations.append(turns)
    if updates and rng.random() < 0.15 and (turns := _update_turn(rng, person)):
        conversations[-1] += turns
    return conversations


def episode(rng: random.Random, num_groups: int | None = None,
            num_conversations: int | None = None, summary_rate: float = 0.08,
            small_talk_rate: float = 0.1, slot_weights: dict[str, float] | None = None,
            only: tuple[str, ...] | None = None, older_first: float = 0.0,
            wrong_acks: float = 0.0) -> dict:
    """One person: earlier conversations, then a final conversation ending in a question turn.

    The question asks about a told slot, drawn uniformly or by `slot_weights` (missing slots
    weigh 1), unless the final turn is a summary question or small talk. `older_first` > 0
    favours facts told long ago: of n told slots, the one with k slots told after it weighs
    (1 + older_first·k) times more. `only` limits what is told to the fact groups of these slots;
    `wrong_acks` is the share of acknowledgements drawn for someone else.

    Returns {"history": [conversation, ...], "messages": final conversation, "slot": the slot
    asked (or "summary" / "small_talk"), "facts": the person's facts}.
    """
    person = random_person(rng)
    num_groups = num_groups or rng.randint(1, len(GROUPS))
    num_conversations = num_conversations or rng.randint(1, 4)
    history = telling_conversations(rng, person, num_groups, num_conversations, only=only,
                                    wrong_acks=wrong_acks)
    final: list[dict] = []
    if rng.random() < 0.3:
        final += _small_talk(rng)
    roll = rng.random()
    if roll < small_talk_rate:
        slot = "small_talk"
        final += _small_talk(rng)
    elif roll < small_talk_rate + summary_rate:
        slot = "summary"
        final += question_turn(rng, person, "summary")
    else:
        if slot_weights or older_first:  # (rng.choice otherwise keeps older data identical)
            n = len(person.told)
            weights = [(slot_weights or {}).get(s, 1.0) * (1.0 + older_first * (n - 1 - i))
                       for i, s in enumerate(person.told)]
            slot = rng.choices(person.told, weights)[0]
        else:
            slot = rng.choice(person.told)
        final += question_turn(rng, person, slot)
    return {"history": history, "messages": final, "slot": slot, "facts": dict(person.facts)}


def mentioned(text: str, slot: str) -> set[str]:
    """The values of `slot` named in `text` (whole words, case-insensitive)."""
    words = set(re.findall(r"[a-z']+", text.lower()))
    return {v for v in VALUES[slot] if v.lower() in words}


def exact_match(reply: str, slot: str, expected: str) -> bool:
    """True when the reply names the expected value of `slot` and no other value of it."""
    return mentioned(reply, slot) == {expected}


def chance(slot: str) -> float:
    """Exact-match rate of a uniform guess."""
    return 1.0 / len(VALUES[slot])
