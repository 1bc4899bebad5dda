"""The demo's synthetic chat domain: people tell the assistant about themselves, then ask later.

A person has up to eight facts in seven groups (name, city, job, pet kind + pet name, trip, food,
hobby). Every fact value is one word; the lists are disjoint, so a reply can be scored by exact
match. Names, cities and pet names are partly composed from syllables (`_composed`): a
sentencepiece vocabulary trained on them splits rare names into reusable pieces, so that a
backbone which learns to *copy* those pieces can also copy a name it never saw.

Facts are told over one or more conversations with small talk between, in many phrasings
(direct, indirect, several facts in one message), sometimes corrected later ("Actually, I moved
to Lima."), sometimes typed casually (lowercase, no final punctuation, light typos); a later
conversation asks about them, or about a fact never told (answer: it was not told).
`tools/build_demo.py` trains the backbone and the δ adapter on this data. The evaluation,
`benchmarks/recall_eval.py`, uses none of this module's phrasings: its own are hand-written in
benchmarks/heldout/recall.json, with values outside these lists.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

# -- values -------------------------------------------------------------------------------------
_NAMES = """Ada Omar Lena Hugo Maya Felix Nora Ivan Sofia Leo Clara Mateo Yara Oscar Emma Kenji
Alma Tariq Ines Bruno Zoe Pavel Rosa Amir Julia Theo Mina Diego Freya Ravi Elsa Jonas Lucia
Nikolai Hana Marco Olga Samir Vera Paulo Anna Ben Carla David Elena Frank Grace Henry Irene Jack
Karen Liam Mark Nina Olivia Peter Quinn Rachel Sam Tina Victor Wendy Xavier Yusuf Zara Adam Beth
Carlos Daniel Eva Fatima George Helen Isaac Jade Kevin Laura Miguel Naomi Owen Paula Rita Simon
Thomas Ursula Vincent William Yasmin Zack Alice Boris Chloe Dario Esther Fiona Gabriel Hector Ingrid
Jamal Keiko Lars Magda Nadia Orlando Pedro Rafael Sara Tobias Umar Valentina Walter Yuki Aaron
Bianca Cyrus Dora Emil Flora Gustav Hiro Ida Jorge Kamal Lina Malik Nils Otto Petra Rohan Selma
Tomas Uma Viktor Wanda Ali Bea Chen Dev Eli Femi Gia Hassan Ivy Joel Kai Lea Max Noor Oren Pia
Raj Suki Tara Udo Vic Wei Xena Yan Zane Anika Bastian Celine Dominik Enzo Fabio Gwen Harriet
Ilya Janet Kofi Leila Mohammed Nadine Ophelia Pablo Renata Stefan Tatiana Ulrich Vanessa Wilhelm
Ximena Yolanda Zeynep""".split()
_CITIES = """Paris Berlin Lisbon Madrid Rome Vienna Prague Oslo Dublin Warsaw Athens Cairo Nairobi
Lagos Tokyo Seoul Hanoi Lima Quito Bogota Denver Boston Chicago Toronto Montreal Sydney Auckland
Mumbai Istanbul Helsinki Amsterdam Brussels Zurich Geneva Munich Hamburg Frankfurt Cologne
Stockholm Copenhagen Riga Vilnius Krakow Budapest Bucharest Belgrade Zagreb Ljubljana Bratislava
Milan Naples Venice Florence Turin Seville Valencia Barcelona Bilbao Marseille Lyon Bordeaux
Toulouse Manchester Liverpool Glasgow Edinburgh Bristol Leeds Cardiff Belfast Cork Antwerp
Rotterdam Utrecht Salzburg Innsbruck Basel Bern Lausanne Faro Casablanca Tunis Algiers Accra
Dakar Kampala Kigali Johannesburg Durban Dubai Doha Riyadh Tehran Beirut Amman Delhi Bangalore
Chennai Kolkata Karachi Lahore Dhaka Kathmandu Colombo Bangkok Jakarta Manila Osaka Nagoya
Sapporo Busan Shanghai Beijing Shenzhen Taipei Melbourne Brisbane Perth Adelaide Wellington
Vancouver Calgary Ottawa Seattle Portland Austin Dallas Houston Miami Atlanta Phoenix Detroit
Nashville Memphis Orlando Philadelphia Baltimore Pittsburgh Cleveland Minneapolis Milwaukee
Sacramento Honolulu Anchorage Havana Caracas Medellin Guayaquil Santiago Montevideo Asuncion
Cordoba Rosario Recife Manaus Curitiba Fortaleza Monterrey Guadalajara Tijuana Cancun Puebla
Oaxaca""".split()
_JOBS = """nurse teacher baker pilot plumber lawyer dentist chef farmer architect librarian engineer
painter journalist firefighter pharmacist carpenter musician photographer mechanic electrician
gardener translator accountant veterinarian doctor surgeon paramedic therapist psychologist
scientist chemist biologist physicist geologist astronomer mathematician programmer developer
designer economist banker broker cashier clerk secretary receptionist waiter bartender barista
butcher fishmonger grocer florist tailor seamstress cobbler jeweler locksmith blacksmith
bricklayer roofer plasterer tiler mason janitor cleaner housekeeper nanny babysitter tutor
professor lecturer principal counselor coach trainer athlete dancer singer actor director
producer writer author poet novelist editor reporter columnist illustrator animator sculptor
potter weaver printer publisher bookseller archivist curator historian archaeologist
anthropologist sociologist linguist interpreter diplomat politician mayor judge detective
policeman soldier sailor captain fisherman lumberjack miner driver trucker courier postman
chauffeur machinist technician dietitian nutritionist radiologist optometrist dermatologist
pediatrician cardiologist neurologist ranger shepherd landscaper contractor inspector auditor
consultant manager entrepreneur analyst statistician actuary realtor recruiter salesman marketer
copywriter stylist hairdresser barber beautician physiotherapist chiropractor astronaut
lifeguard bodyguard warden butler concierge cook caterer confectioner brewer winemaker rancher
plumber""".split()
_PETS = """dog cat rabbit parrot hamster turtle goldfish horse ferret lizard canary hedgehog pony
donkey iguana snake budgie cockatiel mouse rat gerbil chicken duck pig sheep llama tortoise frog
toad newt salamander chameleon python owl pigeon finch lovebird macaw parakeet cockatoo goose
quail snail spider cow""".split()
_PET_NAMES = """Rex Milo Luna Bella Coco Biscuit Pepper Shadow Ziggy Noodle Mochi Pickles Rocky
Daisy Oreo Toby Ginger Peanut Boots Bubbles Socks Nacho Pixel Olive Teddy Maple Juno Kiwi Smokey
Buddy Bailey Sadie Buster Bandit Bear Cookie Cupcake Dexter Domino Dusty Fluffy Frodo Gus Honey
Jasper Jelly Lucky Marshmallow Midnight Muffin Nugget Otis Patches Pebbles Pumpkin Rascal Rusty
Scout Snowball Sparky Spike Sprinkles Squeaky Sunny Thor Tiger Tinkerbell Tucker Whiskers Winston
Zeus Apollo Cinnamon Nutmeg Button Clover Dolly Ember Fern Flint Hopper Indigo Jinx Lego Nibbles
Onyx Paws Ripley Saffron Sprout Tango Velvet Wiggles Yoshi Acorn Bingo Bolt Bubba Chip Comet
Cosmo Dash Echo Fizz Hobbes Inky Jazz Loki Marbles Ninja Ozzy Puck Quill Rolo Scooter Tux Waldo
Yeti Zippy""".split()
_TRIPS = """Japan Peru Iceland Kenya Norway Mexico Brazil Egypt Greece Canada Chile India Morocco
Vietnam Portugal Scotland Nepal Argentina Thailand Australia Spain France Italy Germany Austria
Switzerland Belgium Netherlands Denmark Sweden Finland Poland Hungary Croatia Slovenia Romania
Bulgaria Serbia Albania Turkey Cyprus Malta Ireland Wales England Tunisia Algeria Senegal Ghana
Nigeria Ethiopia Tanzania Uganda Rwanda Namibia Botswana Zambia Mozambique Israel Lebanon Oman
Qatar Iran Pakistan Bangladesh Cambodia Laos Myanmar Malaysia Indonesia Philippines China Korea
Taiwan Fiji Samoa Tonga Cuba Jamaica Haiti Panama Ecuador Colombia Bolivia Paraguay Venezuela
Guatemala Honduras Nicaragua Belize Latvia Lithuania Ukraine Armenia Kazakhstan Uzbekistan
Russia Greenland Tahiti""".split()
_FOODS = """pizza sushi pasta tacos curry ramen paella dumplings pancakes lasagna falafel burgers
risotto chocolate cheesecake steak omelettes couscous hummus burritos kebab gnocchi croissants
tiramisu enchiladas noodles spaghetti ravioli tortellini carbonara pesto pho laksa biryani dal
samosas naan korma vindaloo paneer kimchi bulgogi tempura udon soba gyoza teriyaki yakitori tofu
miso wontons satay rendang quesadillas nachos fajitas tamales churros guacamole empanadas arepas
feijoada gazpacho tapas chorizo croquettes crepes quiche ratatouille fondue raclette schnitzel
bratwurst pretzels strudel bagels pastrami brownies muffins cupcakes cookies donuts popcorn
sandwiches salad soup stew chili meatballs sausages bacon porridge oatmeal granola yogurt toast
cheese olives avocado mango strawberries blueberries cherries lobster shrimp oysters mussels
salmon tuna sardines calamari hotdogs ribs barbecue brisket polenta focaccia bruschetta cannoli
gelato baklava souvlaki gyros tzatziki shawarma tabbouleh""".split()
_HOBBIES = """chess painting hiking knitting gardening cycling swimming fishing dancing climbing
surfing pottery running singing skiing reading sailing yoga archery juggling photography drawing
sketching sewing crocheting quilting embroidery woodworking carving baking cooking brewing camping
kayaking canoeing rowing diving snorkeling skating skateboarding snowboarding golf tennis
badminton squash volleyball basketball football soccer baseball cricket rugby hockey boxing karate
judo taekwondo wrestling jogging walking stargazing writing poetry blogging podcasting gaming
puzzles crosswords sudoku scrabble poker bowling billiards darts meditation pilates gymnastics
parkour hunting foraging volunteering genealogy magic acting karaoke sculpting scrapbooking
journaling mountaineering paragliding skydiving riding""".split()

_ONSETS = ["b", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch",
           "sh", "br", "dr", "kr", "tr", "st", ""]
_VOWELS = ["a", "e", "i", "o", "u", "a", "i", "ia", "ei", "ou"]
_CODAS = ["", "", "", "n", "l", "r", "s", "m", "k"]
_NAME_ENDS = ["a", "o", "i", "e", "an", "el", "ia", "ir", "on", "us", "ine", "ette", "ito", "ika",
              "ara", "ena", "am", "en", "ya", "io"]
_CITY_ENDS = ["burg", "ville", "ton", "ford", "stad", "grad", "polis", "mouth", "field", "haven",
              "port", "dale", "bridge", "holm", "berg", "minster"]
_PET_ENDS = ["kins", "ster", "bles", "zy", "pop", "bug", "y", "o", "ie", "sy", "boo", "nut"]


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _composed(rng: random.Random, count: int, make, taken: set[str]) -> list[str]:
    """`count` new capitalised one-word values from `make(rng)`, none in `taken` (lowercase)."""
    out: list[str] = []
    while len(out) < count:
        word = make(rng)
        if word.isalpha() and 4 <= len(word) <= 10 and word not in taken:
            taken.add(word)
            out.append(word.capitalize())
    return out


def _build_values() -> dict[str, list[str]]:
    """The value lists: the hand-written ones, then composed names, cities and pet names (a fixed
    seed), none of them a word of the templates or of another list."""
    lists = {"name": _NAMES, "city": _CITIES, "job": _JOBS, "pet": _PETS, "pet_name": _PET_NAMES,
             "trip": _TRIPS, "food": _FOODS, "hobby": _HOBBIES}
    taken = set(_template_words())
    values: dict[str, list[str]] = {}
    for slot, words in lists.items():
        values[slot] = []
        for w in words:
            if w.lower() not in taken:
                taken.add(w.lower())
                values[slot].append(w)
    rng = random.Random(1729)
    values["name"] += _composed(rng, 1000 - len(values["name"]),
                                lambda r: r.choice(_ONSETS) + r.choice(_VOWELS)
                                + r.choice(["", "", "n", "l", "r"]) + r.choice(_ONSETS[:16])
                                + r.choice(_NAME_ENDS), taken)
    values["city"] += _composed(rng, 300 - len(values["city"]),
                                lambda r: _syllable(r) + r.choice(_CITY_ENDS), taken)
    values["pet_name"] += _composed(rng, 300 - len(values["pet_name"]),
                                    lambda r: _syllable(r) + r.choice(_PET_ENDS), taken)
    return values


def _a(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


# -- phrasings ----------------------------------------------------------------------------------
TELL = {
    "name": ["My name is {name}.", "I'm {name}, by the way.", "Hi! I am {name}.",
             "You can call me {name}.", "Hello, my name is {name}.", "I am {name}.",
             "Hi, I'm {name}.", "My friends call me {name}.", "Call me {name}.",
             "It's {name} here.", "Let me introduce myself: I'm {name}.",
             "Name's {name}, nice to meet you.", "My parents named me {name}.",
             "Hello! {name} speaking.", "Hey, I'm {name}."],
    "city": ["I live in {city}.", "I moved to {city} last year.", "I am from {city}.",
             "My home is in {city}.", "These days I live in {city}.", "I'm from {city}.",
             "I grew up in {city} and still live there.", "I've lived in {city} all my life.",
             "My place is in {city}.", "I live in {city} now.",
             "I'm living in {city} at the moment.", "I recently settled in {city}.",
             "My city is {city}.", "I'm writing from my flat in {city}."],
    "job": ["I work as {a_job} {job}.", "I am {a_job} {job}.", "My job? I am {a_job} {job}.",
            "I have been {a_job} {job} for years.", "I'm {a_job} {job}.",
            "By profession I am {a_job} {job}.", "I make a living as {a_job} {job}.",
            "I just started working as {a_job} {job}.", "At work I'm {a_job} {job}.",
            "I've worked as {a_job} {job} for ten years.", "Professionally, I'm {a_job} {job}.",
            "My job is being {a_job} {job}."],
    "pet": ["I have {a_pet} {pet} named {pet_name}.", "My {pet} is called {pet_name}.",
            "I just adopted {a_pet} {pet}. I named it {pet_name}.",
            "I have {a_pet} {pet} called {pet_name}.", "My {pet}'s name is {pet_name}.",
            "I share my home with {a_pet} {pet} named {pet_name}.",
            "{pet_name} is the name of my {pet}.", "I own {a_pet} {pet}; its name is {pet_name}.",
            "My pet is {a_pet} {pet} called {pet_name}.",
            "There's {a_pet} {pet} at my place, {pet_name}."],
    "trip": ["Next month I am going to {trip}.", "I am planning a trip to {trip}.",
             "This summer I will travel to {trip}.", "I booked a holiday in {trip}.",
             "I'm going to {trip} next week.", "I'm traveling to {trip} soon.",
             "My next trip is to {trip}.", "I'm visiting {trip} in the spring.",
             "I can't wait for my trip to {trip}.", "In a few weeks I fly to {trip}.",
             "I'm taking a vacation in {trip} this year."],
    "food": ["My favorite food is {food}.", "I love {food}.", "Nothing beats {food} for dinner.",
             "I could eat {food} every day.", "I really love eating {food}.",
             "My favourite food is {food}.", "{food} is my favorite food.", "I adore {food}.",
             "I'm a big fan of {food}.", "My favorite dish is {food}.",
             "When I eat out, I always order {food}."],
    "hobby": ["My hobby is {hobby}.", "I really enjoy {hobby}.",
              "On weekends I do a lot of {hobby}.", "Lately I have been into {hobby}.",
              "In my free time I do {hobby}.", "My favorite hobby is {hobby}.",
              "I spend my weekends on {hobby}.", "I've taken up {hobby}.",
              "I'm passionate about {hobby}.", "My main hobby is {hobby}.", "{hobby} is my hobby."],
}
# Two fact groups in one sentence (besides two or three sentences in one message).
TELL_TOGETHER = {
    ("name", "city"): ["I'm {name} from {city}.", "My name is {name} and I live in {city}."],
    ("name", "job"): ["My name is {name} and I work as {a_job} {job}."],
    ("city", "job"): ["I live in {city} and work as {a_job} {job}."],
    ("food", "hobby"): ["I love {food}, and my hobby is {hobby}."],
    ("pet", "food"): ["I have {a_pet} {pet} named {pet_name} and I love {food}."],
}
ACK = {
    "name": ["Nice to meet you, {name}!", "Hello {name}, nice to meet you.",
             "Great to meet you, {name}. How can I help?", "Hi {name}! Good to meet you."],
    "city": ["{city} is a lovely place.", "Oh, I have heard good things about {city}.",
             "Nice, how do you like living in {city}?", "{city}, how nice!"],
    "job": ["Being {a_job} {job} sounds interesting.", "So you are {a_job} {job}! That must keep "
            "you busy."],
    "pet": ["{pet_name} sounds adorable!", "{A_pet} {pet} named {pet_name}! How lovely.",
            "Say hi to {pet_name} for me."],
    "trip": ["{trip} sounds exciting! Have a great trip.", "Enjoy {trip}!"],
    "food": ["Good choice, {food} is delicious.", "Yum, {food}!"],
    "hobby": ["{hobby} sounds like fun.", "{hobby} is a great way to relax."],
}
GENERIC_ACK = ["Got it, I will remember that.", "Thanks for telling me!", "That sounds great."]
# Corrections of a told fact: (user, acknowledgement); {old} is the value it replaces.
UPDATE = {
    "city": [("Actually, I just moved to {city}.", "Congratulations on the move to {city}!"),
             ("Actually I moved to {city}.", "Noted, you live in {city} now."),
             ("I don't live in {old} anymore, I moved to {city}.", "Got it, {city} now."),
             ("Correction: I live in {city} now.", "Noted, {city}.")],
    "job": [("I changed jobs. Now I am {a_job} {job}.", "Good luck as {a_job} {job}!"),
            ("Actually I'm {a_job} {job} now.", "Noted, you are {a_job} {job} now."),
            ("I quit being {a_old} {old}. I'm {a_job} {job} now.", "Good luck as {a_job} {job}!")],
    "trip": [("Change of plans: I am going to {trip} instead.", "Noted, {trip} it is."),
             ("Actually, the trip is to {trip} now, not {old}.", "Noted, {trip} it is.")],
    "food": [("These days my favorite food is {food}.", "Noted, you like {food} now."),
             ("Actually, I prefer {food} now.", "Noted, {food} it is.")],
    "hobby": [("I gave up {old}. Now I do {hobby}.", "Noted, {hobby} now."),
              ("Actually, my hobby is {hobby} these days.", "{hobby} it is, then.")],
    "name": [("Sorry, I mistyped. My name is {name}.", "No problem, {name}!")],
}
QUESTIONS = {
    "name": ["What is my name?", "Do you remember my name?", "Who am I?",
             "Can you tell me my name?", "What name did I give you?", "Do you know my name?",
             "Say my name.", "What am I called?", "Tell me my name."],
    "city": ["Where do I live?", "Which city do I live in?", "Do you remember where I live?",
             "What city do I live in?", "Where is my home?", "Where am I from?",
             "In which city do I live?", "Tell me where I live."],
    "job": ["What do I do for a living?", "What is my job?", "Do you remember my job?",
            "What's my job?", "What is my occupation?", "What work do I do?", "Tell me my job.",
            "How do I make a living?"],
    "pet": ["What kind of pet do I have?", "What animal do I have at home?", "What pet do I have?",
            "What's my pet?", "What type of animal do I own?", "Do you remember my pet?",
            "What animal is {pet_name}?"],
    "pet_name": ["What is my pet's name?", "What is my pet called?", "What's my pet's name?",
                 "What is the name of my pet?", "Do you remember my pet's name?",
                 "What did I call my pet?", "What's the name of my pet?",
                 "What's my {pet}'s name?"],
    "trip": ["Where am I going on my trip?", "Where am I traveling to?",
             "Where am I going on holiday?", "Which country am I going to?", "Where is my trip?",
             "Do you remember where I'm traveling?", "What's my travel destination?"],
    "food": ["What is my favorite food?", "What do I like to eat?", "What's my favorite food?",
             "What food do I love?", "What is my favourite food?", "Which food do I like most?",
             "Do you remember my favorite food?"],
    "hobby": ["What is my hobby?", "What do I enjoy in my free time?", "What's my hobby?",
              "What do I do in my spare time?", "Do you remember my hobby?",
              "What is my favorite hobby?", "How do I spend my free time?", "What am I into?"],
}
ANSWERS = {
    "name": "Your name is {name}.", "city": "You live in {city}.",
    "job": "You work as {a_job} {job}.", "pet": "You have {a_pet} {pet}.",
    "pet_name": "Your pet is called {pet_name}.", "trip": "You are going to {trip}.",
    "food": "Your favorite food is {food}.", "hobby": "Your hobby is {hobby}.",
}
NOT_TOLD = {
    "name": "You haven't told me your name yet.",
    "city": "You haven't told me where you live yet.",
    "job": "You haven't told me what you do for a living yet.",
    "pet": "You haven't told me about a pet yet.",
    "pet_name": "You haven't told me your pet's name yet.",
    "trip": "You haven't told me about a trip yet.",
    "food": "You haven't told me your favorite food yet.",
    "hobby": "You haven't told me your hobby yet.",
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
    ("Hello!", "Hello! Tell me about yourself, and I will remember it."),
    ("Hi there.", "Hi! What would you like to talk about?"),
    ("What can you remember?", "Your name, where you live, your job, your pet, your travel "
     "plans, your favorite food and your hobby."),
    ("Are you a robot?", "I am a small assistant with a memory."),
    ("I'm hungry.", "Maybe it is time for a snack."),
    ("That's funny.", "I am glad it made you smile."),
    ("Ok, thanks.", "Anytime!"),
    ("Nevermind.", "No problem."),
    ("I can't sleep.", "Try reading something calm for a while."),
    ("Lol", "Glad you are having fun."),
    ("What day is it today?", "I am not sure, but I hope it is a good one."),
    ("I'm back!", "Welcome back! What's new?"),
]
SUMMARY_ORDER = ("name", "city", "job", "pet", "pet_name", "trip", "food", "hobby")

# -- wider phrasings (v3) -------------------------------------------------------------------------
# Asked in words its data never used ("What is my line of work?"), v2's backbone answered about
# another fact: how a question names the fact matters more than its sentence. v3 adds sentence
# frames × the names people use for each fact (ASK_FRAMES × FACT_NAMES), more whole questions
# (ASK_MORE) and more ways of telling (TELL_MORE). A person draws from them only with
# `Person.wide` (episode(wide=True)), so that v2's data is rebuilt unchanged.
ASK_FRAMES = ["What is my {f}?", "Do you remember my {f}?", "Do you know my {f}?",
              "Can you tell me my {f}?", "Tell me my {f}.", "Remind me of my {f}.",
              "What was my {f} again?", "Can you remind me what my {f} is?",
              "I forgot my {f}. What is it?", "Do you recall my {f}?", "Did I tell you my {f}?",
              "What did I say my {f} was?", "So what's my {f}?", "Quick question: what is my {f}?",
              "Any idea what my {f} is?", "And my {f}?", "What about my {f}?",
              "Could you repeat my {f}?", "Hey, what's my {f} again?",
              "My {f}, do you remember it?", "Do you still know my {f}?",
              "What do you remember about my {f}?"]
FACT_NAMES = {
    "name": ["name", "first name", "own name"],
    "city": ["city", "home city", "hometown", "home town", "town", "current city",
             "place of residence", "city of residence"],
    "job": ["job", "occupation", "profession", "line of work", "career", "trade", "day job",
            "current job", "work"],
    "pet": ["pet", "pet animal"],
    "pet_name": ["pet's name", "{pet}'s name", "pet's name again"],
    "trip": ["trip", "next trip", "travel destination", "holiday destination", "destination",
             "vacation destination", "upcoming trip", "travel plans", "holiday plans",
             "vacation plans"],
    "food": ["favorite food", "favourite food", "favorite dish", "favourite dish", "favorite meal",
             "go-to food", "comfort food", "favorite thing to eat"],
    "hobby": ["hobby", "favorite hobby", "favourite hobby", "pastime", "favorite pastime",
              "favorite activity", "free-time activity", "leisure activity", "weekend activity",
              "main hobby"],
}
ASK_MORE = {
    "name": ["What do you call me?", "Who am I again?", "Do you remember who I am?",
             "What name do I go by?", "Who is talking to you?", "How should you call me?",
             "Whats my name", "what am i called", "Who am I, do you know?"],
    "city": ["Where do I live now?", "Where is home for me?", "Where am I living these days?",
             "Which city is my home?", "In what town do I live?", "Where do I stay?",
             "Which place do I live in?", "Where's my home?", "Where do I come from?"],
    "job": ["What do I work as?", "What do I do for work?", "What kind of job do I have?",
            "What am I by profession?", "What is it that I do?", "How do I earn money?",
            "What do I do all day at work?", "Which job do I have?"],
    "pet": ["What animal do I own?", "What kind of animal do I have?", "Which pet do I have?",
            "What animal lives at my place?", "Do I have a pet?", "What type of pet is {pet_name}?",
            "What kind of animal is {pet_name}?", "Which animal did I adopt?"],
    "pet_name": ["What is my {pet} called?", "What's the name of my {pet}?",
                 "What did I call my {pet}?", "Do you remember my {pet}'s name?",
                 "What is my pet's name again?", "How is my {pet} called?",
                 "What name did I give my {pet}?", "Who is my {pet}?"],
    "trip": ["Where am I going?", "Where am I traveling next?", "Where am I flying to?",
             "Which country am I off to?", "Where will I travel?", "Where is my vacation?",
             "Where am I going on vacation?", "Where's my holiday?", "Where do I travel soon?",
             "Which country will I visit?"],
    "food": ["What do I like to eat most?", "What food do I love most?",
             "What meal do I like best?", "Which dish do I love?", "What do I always order?",
             "What could I eat every day?", "Which food is my favorite?", "What do I love eating?"],
    "hobby": ["What do I like doing?", "What do I enjoy doing?", "How do I spend my weekends?",
              "What keeps me busy in my spare time?", "What activity do I love?",
              "What do I do when I'm free?", "What am I passionate about?",
              "What do I do after work?"],
}
TELL_MORE = {
    "name": ["Hi, {name} here.", "People call me {name}.", "Hey! My name's {name}.",
             "I'm called {name}.", "Just so you know, my name is {name}.", "This is {name}."],
    "city": ["My hometown is {city}.", "I stay in {city}.", "I'm living in {city} these days.",
             "I've made my home in {city}.", "Right now I live in {city}.",
             "My house is in {city}."],
    "job": ["I do {a_job} {job}'s work.", "My occupation is {job}.",
            "I'm employed as {a_job} {job}.", "My profession: {job}.",
            "I work as {a_job} {job} these days.", "I'm {a_job} {job} at the moment."],
    "pet": ["I have a pet {pet} called {pet_name}.", "{pet_name} is my {pet}, and I love it.",
            "My {pet} {pet_name} lives with me.", "I got {a_pet} {pet} and called it {pet_name}."],
    "trip": ["I'm off to {trip} next month.", "My holiday this year is in {trip}.",
             "Soon I'll be traveling to {trip}.", "I'm going on vacation to {trip}.",
             "We booked flights to {trip}."],
    "food": ["My favourite dish is {food}.", "I eat {food} whenever I can.",
             "{food} is what I like most.", "Best food ever? {food}.", "I'm obsessed with {food}."],
    "hobby": ["My pastime is {hobby}.", "I love doing {hobby}.", "For fun I do {hobby}.",
              "Most weekends I go {hobby}.", "My thing is {hobby}.",
              "When I'm free I do {hobby}."],
}


def _wide_questions() -> dict[str, list[str]]:
    return {slot: [f.format(f=name) for name in names for f in ASK_FRAMES] + ASK_MORE[slot]
            for slot, names in FACT_NAMES.items()}


WIDE_QUESTIONS = _wide_questions()


def phrasing_key(text: str) -> str:
    """A phrasing with case, spacing, punctuation and the article placeholders ({a_job},
    {a_pet}) set aside: two phrasings with one key are the same phrasing."""
    text = text.lower().replace("’", "'").replace("{a_pet}", "{a}").replace("{a_job}", "{a}")
    return " ".join(re.findall(r"[a-z{}_']+", text))


def withhold(sentences) -> int:
    """Remove from the wide phrasings every one equal to one of `sentences` (case, spacing and
    punctuation aside): the evaluation's held-out phrasings are never generated. Returns how many
    were removed."""
    banned = {phrasing_key(t) for t in sentences}
    removed = 0
    for table in (WIDE_QUESTIONS, TELL_MORE):
        for slot, texts in table.items():
            kept = [t for t in texts if phrasing_key(t) not in banned]
            removed += len(texts) - len(kept)
            table[slot] = kept
    return removed



def _template_words() -> list[str]:
    texts = [t for ts in TELL.values() for t in ts] + [t for ts in QUESTIONS.values() for t in ts]
    texts += [t for ts in ACK.values() for t in ts] + list(ANSWERS.values()) + GENERIC_ACK
    texts += [t for ts in TELL_TOGETHER.values() for t in ts] + list(NOT_TOLD.values())
    texts += [t for ts in UPDATE.values() for pair in ts for t in pair] + SUMMARY_QUESTIONS
    texts += [t for pair in SMALL_TALK for t in pair]
    return [w for t in texts for w in re.findall(r"[a-z']+", re.sub(r"\{\w+\}", " ", t).lower())]


VALUES: dict[str, list[str]] = _build_values()
SLOTS = tuple(VALUES)
# Facts told together: the pet's kind and its name come in one sentence.
GROUPS = (("name",), ("city",), ("job",), ("pet", "pet_name"), ("trip",), ("food",), ("hobby",))


# -- people and turns ---------------------------------------------------------------------------
@dataclass
class Person:
    """One user's facts (as they typed them); `told` lists the slots told so far (in order)."""

    facts: dict[str, str]
    told: list[str] = field(default_factory=list)
    wide: bool = False  # draw from the wider v3 phrasings too

    def fill(self, template: str, facts: dict[str, str] | None = None, **extra: str) -> str:
        f = {**(facts or self.facts), **extra}
        text = template.format(**f, a_job=_a(f["job"]), a_pet=_a(f["pet"]),
                               A_pet=_a(f["pet"]).capitalize(),
                               a_old=_a(f.get("old", "x")))
        return text[0].upper() + text[1:]


def random_person(rng: random.Random) -> Person:
    return Person({slot: rng.choice(values) for slot, values in VALUES.items()})


def answer(person: Person, slot: str) -> str:
    return person.fill(ANSWERS[slot])


def summary(person: Person) -> str:
    """The canonical answer to "What do you know about me?": every told fact, in a fixed order."""
    return " ".join(answer(person, s) for s in SUMMARY_ORDER if s in person.told)


def casual(text: str, rng: random.Random, keep: set[str] = frozenset()) -> str:
    """Typed the way many people type: lowercase, no final punctuation, apostrophes and commas
    sometimes dropped, now and then one typo (swapped, missing or doubled letter) in a word that
    is not in `keep` (the fact values: those stay spelled right, in lowercase)."""
    text = text.lower()
    if rng.random() < 0.8:
        text = text.rstrip(".!?")
    if rng.random() < 0.4:
        text = text.replace("'", "")
    if rng.random() < 0.3:
        text = text.replace(",", "")
    words = text.split(" ")
    spots = [i for i, w in enumerate(words)
             if len(w) >= 4 and w.isalpha() and not any(k in w for k in keep)]
    if spots and rng.random() < 0.5:
        i = rng.choice(spots)
        w, j = words[i], rng.randrange(1, len(words[i]) - 1)
        words[i] = rng.choice([w[:j] + w[j + 1] + w[j] + w[j + 2:], w[:j] + w[j + 1:],
                               w[:j] + w[j] + w[j:]])
    return " ".join(words)


def _typed(person: Person, slots, rng: random.Random, casual_rate: float, text: str) -> str:
    """`text` as the user typed it; a casually typed fact value is lowercase from then on."""
    if not casual_rate or rng.random() >= casual_rate:
        return text
    for s in slots:
        person.facts[s] = person.facts[s].lower()
    return casual(text, rng, {v.lower() for v in person.facts.values()})


def _tell_turn(rng: random.Random, person: Person, groups: list[tuple[str, ...]],
               wrong_acks: float = 0.0, casual_rate: float = 0.0) -> list[dict]:
    """A user message telling one to three fact groups, and the assistant's acknowledgement
    (naming what was told). With probability `wrong_acks` the acknowledgement is someone else's
    (naming their fact, as a small model's own acknowledgements often do: the memory must trust
    what the user said)."""
    key = tuple(g[0] for g in groups)
    if key in TELL_TOGETHER and rng.random() < 0.5:
        sentences = [person.fill(rng.choice(TELL_TOGETHER[key]))]
    else:
        sentences = [person.fill(rng.choice(TELL[g[0]] + TELL_MORE[g[0]] if person.wide
                                            else TELL[g[0]])) for g in groups]
    if rng.random() < 0.2:
        sentences.insert(0, rng.choice(["Hi!", "Hello again.", "Guess what?", "So,"]))
    slots = [s for g in groups for s in g]
    for s in slots:
        if s not in person.told:
            person.told.append(s)
    text = _typed(person, slots, rng, casual_rate, " ".join(sentences))
    last = groups[-1][0]
    if rng.random() < 0.9:  # mostly naming the value: the backbone learns to copy it
        reply = person.fill(rng.choice(ACK[last]))
        if len(groups) > 1:  # the acknowledgement names every fact told
            reply = " ".join(person.fill(rng.choice(ACK[g[0]])) for g in groups)
    else:
        reply = rng.choice(GENERIC_ACK)
    if wrong_acks and rng.random() < wrong_acks:  # (no draw at 0)
        other = random_person(rng)
        reply = other.fill(rng.choice(ACK[last]))
    return [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]


def _small_talk(rng: random.Random, casual_rate: float = 0.0) -> list[dict]:
    user, assistant = rng.choice(SMALL_TALK)
    if casual_rate and rng.random() < casual_rate:
        user = casual(user, rng)
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _update_turn(rng: random.Random, person: Person, casual_rate: float = 0.0) -> list[dict] | None:
    slots = [s for s in UPDATE if s in person.told]
    if not slots:
        return None
    slot = rng.choice(slots)
    old = person.facts[slot]
    person.facts[slot] = rng.choice([v for v in VALUES[slot] if v.lower() != old.lower()])
    user, reply = rng.choice(UPDATE[slot])
    user = _typed(person, [slot], rng, casual_rate, person.fill(user, old=old))
    return [{"role": "user", "content": user},
            {"role": "assistant", "content": person.fill(reply, old=old)}]


def question_turn(rng: random.Random, person: Person, slot: str | None = None,
                  casual_rate: float = 0.0) -> list[dict]:
    """Ask about one told fact (with slot "summary", about everything; a slot never told is
    answered as not told)."""
    if slot == "summary":
        question, reply = rng.choice(SUMMARY_QUESTIONS), summary(person)
    else:
        slot = slot or rng.choice(person.told)
        question = person.fill(rng.choice(QUESTIONS[slot] + WIDE_QUESTIONS[slot] if person.wide
                                          else QUESTIONS[slot]))
        reply = answer(person, slot) if slot in person.told else NOT_TOLD[slot]
    if casual_rate and rng.random() < casual_rate:
        question = casual(question, rng)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


def telling_conversations(rng: random.Random, person: Person, num_groups: int,
                          num_conversations: int, updates: bool = True,
                          only: tuple[str, ...] | None = None,
                          wrong_acks: float = 0.0, casual_rate: float = 0.0) -> list[list[dict]]:
    """Conversations telling `num_groups` fact groups (random order), small talk between;
    `only` limits the groups to those holding these slots; `casual_rate` is the share of user
    messages typed casually. A message tells one to three groups; a quarter of the people
    correct a fact at the end."""
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
            turns += _small_talk(rng, casual_rate)
        i = 0
        while i < len(part):
            take = 2 if i + 1 < len(part) and rng.random() < 0.3 else 1
            if take == 2 and i + 2 < len(part) and rng.random() < 0.3:
                take = 3
            turns += _tell_turn(rng, person, part[i:i + take], wrong_acks, casual_rate)
            i += take
            if rng.random() < 0.3:
                turns += _small_talk(rng, casual_rate)
        if conversations and rng.random() < 0.3:  # ask about something told earlier
            turns += question_turn(rng, person, casual_rate=casual_rate)
        conversations.append(turns)
    if updates and rng.random() < 0.25 and (
            turns := _update_turn(rng, person, casual_rate)):
        conversations[-1] += turns
    return conversations


def episode(rng: random.Random, num_groups: int | None = None,
            num_conversations: int | None = None, summary_rate: float = 0.08,
            small_talk_rate: float = 0.1, slot_weights: dict[str, float] | None = None,
            only: tuple[str, ...] | None = None, older_first: float = 0.0,
            wrong_acks: float = 0.0, not_told_rate: float = 0.0,
            casual_rate: float = 0.0, wide: bool = False) -> dict:
    """One person: earlier conversations, then a final conversation ending in a question turn.

    The question asks about a told slot, drawn uniformly or by `slot_weights` (missing slots
    weigh 1), unless the final turn is a summary question or small talk. `older_first` > 0
    favours facts told long ago: of n told slots, the one with k slots told after it weighs
    (1 + older_first·k) times more. `only` limits what is told to the fact groups of these slots;
    `wrong_acks` is the share of acknowledgements drawn for someone else; `not_told_rate` the
    share of questions about a slot never told (answered as not told); `casual_rate` the share
    of user messages typed casually (`casual`); `wide` draws from the v3 phrasings too.

    Returns {"history": [conversation, ...], "messages": final conversation, "slot": the slot
    asked (or "summary" / "small_talk"), "facts": the person's facts, "told": the told slots}.
    """
    person = random_person(rng)
    person.wide = wide
    num_groups = num_groups or rng.randint(1, len(GROUPS))
    num_conversations = num_conversations or rng.randint(1, 4)
    history = telling_conversations(rng, person, num_groups, num_conversations, only=only,
                                    wrong_acks=wrong_acks, casual_rate=casual_rate)
    final: list[dict] = []
    if rng.random() < 0.3:
        final += _small_talk(rng, casual_rate)
    roll = rng.random()
    untold = [s for s in SLOTS if s not in person.told]
    if roll < small_talk_rate:
        slot = "small_talk"
        final += _small_talk(rng, casual_rate)
    elif roll < small_talk_rate + summary_rate:
        slot = "summary"
        final += question_turn(rng, person, "summary", casual_rate)
    elif not_told_rate and untold and rng.random() < not_told_rate:
        slot = rng.choice(untold)
        final += question_turn(rng, person, slot, casual_rate)
        slot = f"not_told:{slot}"
    else:
        if slot_weights or older_first:
            n = len(person.told)
            weights = [(slot_weights or {}).get(s, 1.0) * (1.0 + older_first * (n - 1 - i))
                       for i, s in enumerate(person.told)]
            slot = rng.choices(person.told, weights)[0]
        else:
            slot = rng.choice(person.told)
        final += question_turn(rng, person, slot, casual_rate)
    return {"history": history, "messages": final, "slot": slot, "facts": dict(person.facts),
            "told": list(person.told)}


_LOWER = {slot: {v.lower(): v for v in values} for slot, values in VALUES.items()}


def mentioned(text: str, slot: str) -> set[str]:
    """The values of `slot` named in `text` (whole words, case-insensitive)."""
    words = set(re.findall(r"[a-z']+", text.lower()))
    return {_LOWER[slot][w] for w in words & _LOWER[slot].keys()}


def exact_match(reply: str, slot: str, expected: str) -> bool:
    """True when the reply names the expected value of `slot` and no other value of it."""
    return {v.lower() for v in mentioned(reply, slot)} == {expected.lower()}


def chance(slot: str) -> float:
    """Exact-match rate of a uniform guess."""
    return 1.0 / len(VALUES[slot])
