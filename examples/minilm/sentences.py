"""Sentences for comparing float and quantized sentence embeddings.

Written for this example: short English sentences across everyday topics, in pairs that say the
same thing in other words. Each sentence's nearest neighbour is then its paraphrase rather than
one of several loosely related sentences, so nearest-neighbour agreement between two models
measures whether quantization changed meaning, not how near-ties happen to break.
"""

from __future__ import annotations

PARAPHRASES: list[tuple[str, str]] = [
    # Weather
    (
        "It has been raining all morning and the streets are flooded.",
        "The roads are under water after a whole morning of rain.",
    ),
    (
        "Tomorrow will be sunny with a light breeze from the west.",
        "The forecast says clear skies and a gentle westerly wind tomorrow.",
    ),
    (
        "A thick fog rolled in over the harbour before dawn.",
        "Before sunrise the port was covered in dense mist.",
    ),
    (
        "Heavy snow closed the mountain pass for three days.",
        "The mountain road was shut for three days because of snowfall.",
    ),
    (
        "Summer evenings here stay warm until well after midnight.",
        "In summer it is still warm here long after midnight.",
    ),
    (
        "A sudden thunderstorm knocked out power across the town.",
        "Lightning from the storm left the whole town without electricity.",
    ),
    (
        "The drought has left the reservoir at its lowest level in decades.",
        "After months without rain the reservoir is emptier than it has been for decades.",
    ),
    # Food and cooking
    (
        "She baked a loaf of sourdough bread for the weekend.",
        "For the weekend she made a sourdough loaf in the oven.",
    ),
    (
        "Add a pinch of salt before the water starts to boil.",
        "Put a little salt in the pot before the water boils.",
    ),
    (
        "The soup needs to simmer for at least forty minutes.",
        "Let the soup cook gently for no less than forty minutes.",
    ),
    (
        "This restaurant serves the best dumplings in the city.",
        "Nowhere in town makes better dumplings than this place.",
    ),
    (
        "Chop the onions finely and fry them until golden.",
        "Dice the onions small and cook them in a pan until they turn golden.",
    ),
    (
        "We ordered pizza because nobody wanted to cook tonight.",
        "Nobody felt like cooking, so we got a pizza delivered.",
    ),
    (
        "Ripe avocados should give slightly when you press them.",
        "You can tell an avocado is ripe when it is a little soft to the touch.",
    ),
    (
        "The cake collapsed because the oven door was opened too early.",
        "Opening the oven too soon made the cake sink in the middle.",
    ),
    # Sports
    (
        "The home team scored in the final minute to win the match.",
        "A goal in the last minute gave the hosts the victory.",
    ),
    (
        "She runs five kilometres every morning before breakfast.",
        "Every day before breakfast she goes for a five kilometre run.",
    ),
    (
        "The marathon was postponed because of the heat wave.",
        "Because of extreme heat, organisers delayed the marathon.",
    ),
    (
        "He broke his wrist while skiing in the Alps.",
        "A skiing accident in the Alps left him with a fractured wrist.",
    ),
    (
        "The referee showed a red card after the dangerous tackle.",
        "After the reckless challenge the player was sent off by the referee.",
    ),
    (
        "Our cycling club rides along the coast every Sunday.",
        "On Sundays the members of our bike club ride by the sea.",
    ),
    # Technology
    (
        "My laptop battery drains much faster since the last update.",
        "Since the latest update my notebook runs out of power quickly.",
    ),
    (
        "Please restart the router if the internet connection drops.",
        "If you lose internet access, try rebooting the router.",
    ),
    (
        "The database query takes several seconds on large tables.",
        "Queries on big tables in the database are slow.",
    ),
    (
        "The server crashed because it ran out of memory.",
        "Running out of memory caused the server to go down.",
    ),
    (
        "She wrote a script to rename thousands of photos automatically.",
        "Her small program renames thousands of pictures without manual work.",
    ),
    (
        "The printer in the office keeps jamming on thick paper.",
        "Thick sheets keep getting stuck in the office printer.",
    ),
    (
        "Two-factor authentication makes stolen passwords less useful.",
        "With a second login factor, a stolen password alone is not enough.",
    ),
    # Health
    (
        "Drinking enough water helps prevent headaches.",
        "Staying hydrated can stop headaches before they start.",
    ),
    (
        "The doctor recommended physiotherapy for my knee injury.",
        "I was told to see a physiotherapist about my injured knee.",
    ),
    (
        "Regular exercise improves sleep quality.",
        "People who exercise often tend to sleep better.",
    ),
    (
        "The clinic offers free flu vaccinations in October.",
        "In October you can get a flu shot at the clinic at no cost.",
    ),
    (
        "He has been allergic to peanuts since childhood.",
        "Ever since he was a child he has reacted badly to peanuts.",
    ),
    (
        "The dentist found two small cavities during my check-up.",
        "At my dental appointment they discovered two little holes in my teeth.",
    ),
    # Travel
    (
        "Our flight to Lisbon was delayed by two hours.",
        "The plane to Lisbon left two hours late.",
    ),
    (
        "Don't forget to bring your passport to the airport.",
        "Remember to pack your passport before going to the airport.",
    ),
    (
        "Backpacking through South America took them six months.",
        "They spent half a year travelling around South America with backpacks.",
    ),
    (
        "The museum is closed on Mondays.",
        "You cannot visit the museum on a Monday.",
    ),
    (
        "We rented a small car to explore the island.",
        "To get around the island we hired a compact car.",
    ),
    (
        "The tour guide spoke four languages fluently.",
        "Our guide was fluent in four different languages.",
    ),
    (
        "We took the night train from Vienna to Venice.",
        "We travelled overnight by rail from Vienna to Venice.",
    ),
    # Work and business
    (
        "The meeting has been moved to Thursday afternoon.",
        "We rescheduled the meeting for Thursday after lunch.",
    ),
    (
        "The quarterly report shows a rise in sales.",
        "Sales went up according to the report for this quarter.",
    ),
    (
        "The startup raised ten million dollars in its first round.",
        "In its first funding round the young company got ten million dollars.",
    ),
    (
        "Please send me the invoice by the end of the week.",
        "I need the bill from you before the week is over.",
    ),
    (
        "Working from home saves me two hours of commuting a day.",
        "Because I work remotely, I no longer spend two hours a day travelling to the office.",
    ),
    (
        "He was promoted to team lead after two years.",
        "Two years after joining he became the leader of his team.",
    ),
    (
        "Our company is hiring three new software engineers.",
        "We have three open positions for software developers.",
    ),
    # Education
    (
        "The students are preparing for their final exams.",
        "Pupils are revising hard for the end of year tests.",
    ),
    (
        "She is learning Japanese with an online course.",
        "An internet class is teaching her Japanese.",
    ),
    (
        "Reading aloud to children builds their vocabulary.",
        "Children learn more words when adults read to them.",
    ),
    (
        "The library extends its opening hours during exam season.",
        "When exams are near, the library stays open longer.",
    ),
    (
        "He finished his doctoral thesis on marine biology.",
        "He completed his PhD dissertation about life in the oceans.",
    ),
    (
        "Homework is due on Friday morning.",
        "The assignments have to be handed in on Friday before noon.",
    ),
    # Nature and animals
    (
        "A family of foxes lives at the edge of the park.",
        "Some foxes have made their home on the border of the park.",
    ),
    (
        "Bees are essential for pollinating many crops.",
        "Many crops depend on bees for pollination.",
    ),
    (
        "Whales migrate thousands of kilometres every year.",
        "Every year whales travel enormous distances.",
    ),
    (
        "My cat sleeps on the windowsill all afternoon.",
        "All afternoon my cat naps by the window.",
    ),
    (
        "Coral reefs are threatened by rising sea temperatures.",
        "Warmer oceans put coral reefs in danger.",
    ),
    (
        "Our dog barks at the postman every single morning.",
        "Each morning the mail carrier gets barked at by our dog.",
    ),
    (
        "Autumn leaves turned the forest red and gold.",
        "In the fall the woods were full of red and golden leaves.",
    ),
    # Home and daily life
    (
        "I need to buy new batteries for the remote control.",
        "The remote control needs fresh batteries.",
    ),
    (
        "The washing machine is making a strange noise.",
        "There is an odd sound coming from the washing machine.",
    ),
    (
        "I forgot my keys and had to wait for my sister.",
        "Having left my keys inside, I waited for my sister to come home.",
    ),
    (
        "We are moving to a bigger apartment next month.",
        "Next month we move into a flat with more space.",
    ),
    (
        "She waters the plants on the balcony every evening.",
        "Every evening she gives the balcony plants some water.",
    ),
    (
        "The bus was so crowded that I had to stand.",
        "There were no free seats on the packed bus, so I stood.",
    ),
    (
        "We painted the kitchen walls a pale green.",
        "The kitchen now has light green walls after we repainted it.",
    ),
    # Music and arts
    (
        "The orchestra played Beethoven's ninth symphony.",
        "Beethoven's ninth was performed by the orchestra.",
    ),
    (
        "The gallery is showing early photographs of the city.",
        "Old photos of the city are on display at the gallery.",
    ),
    (
        "The concert sold out within ten minutes.",
        "All the concert tickets were gone in ten minutes.",
    ),
    (
        "She has been playing the violin since she was five.",
        "She started learning the violin at the age of five.",
    ),
    (
        "He paints landscapes in watercolour.",
        "His watercolour paintings show hills, rivers and fields.",
    ),
    (
        "The novel was adapted into a television series.",
        "The book has been turned into a TV show.",
    ),
    # Science and space
    (
        "The telescope captured images of a distant galaxy.",
        "Pictures of a faraway galaxy were taken by the telescope.",
    ),
    (
        "Water boils at a lower temperature at high altitude.",
        "At high elevations water boils below one hundred degrees.",
    ),
    (
        "Light from the sun takes about eight minutes to reach Earth.",
        "Sunlight needs roughly eight minutes to arrive at our planet.",
    ),
    (
        "The rover collected rock samples on Mars.",
        "A robotic vehicle gathered stones on the surface of Mars.",
    ),
    (
        "Vaccines train the immune system to recognise viruses.",
        "A vaccine teaches the body's defences to identify a virus.",
    ),
    (
        "The experiment had to be repeated because of contamination.",
        "Contaminated samples forced the researchers to run the test again.",
    ),
    # Money and shopping
    (
        "The shop is offering a discount on winter coats.",
        "Winter jackets are on sale at the store.",
    ),
    (
        "Interest rates rose for the third time this year.",
        "This year rates have been raised three times.",
    ),
    (
        "The price of petrol has gone up again.",
        "Fuel is getting more expensive once more.",
    ),
    (
        "He returned the shoes because they were too small.",
        "The shoes did not fit, so he took them back to the shop.",
    ),
    (
        "We split the restaurant bill evenly between the four of us.",
        "The four of us each paid an equal share of the dinner bill.",
    ),
    (
        "She saves a part of her salary every month.",
        "Each month she puts some of her pay aside.",
    ),
    # Transport
    (
        "The train was cancelled because of a signal failure.",
        "A signalling fault led to the train being cancelled.",
    ),
    (
        "Traffic on the motorway was at a standstill.",
        "Cars on the highway were not moving at all.",
    ),
    (
        "He cycles to work even in the rain.",
        "Rain or shine, he rides his bike to the office.",
    ),
    (
        "The subway runs every five minutes during rush hour.",
        "At peak times there is a metro train every five minutes.",
    ),
    (
        "Parking in the city centre is very expensive.",
        "It costs a lot to leave your car downtown.",
    ),
    # Feelings and relationships
    (
        "She was thrilled to hear that she got the job.",
        "Learning she had been hired made her very happy.",
    ),
    (
        "He felt nervous before giving his first speech.",
        "Before his first talk in public he was anxious.",
    ),
    (
        "My grandparents celebrated their fiftieth anniversary.",
        "My grandmother and grandfather marked fifty years of marriage.",
    ),
    (
        "They have been best friends since primary school.",
        "Their close friendship goes back to their first years at school.",
    ),
    (
        "Moving abroad made her feel lonely at first.",
        "At the beginning, living in another country left her feeling isolated.",
    ),
    # History and society
    (
        "The castle was built in the twelfth century.",
        "Construction of the castle dates from the 1100s.",
    ),
    (
        "Citizens voted in record numbers in the election.",
        "Voter turnout in the election was the highest ever.",
    ),
    (
        "Ancient Romans built roads that are still used today.",
        "Some roads made by the Romans are in use to this day.",
    ),
    (
        "The city council approved a new recycling programme.",
        "Local government voted for a new scheme to recycle waste.",
    ),
    (
        "The new law bans smoking in public parks.",
        "Under the new rules, people may no longer smoke in parks.",
    ),
    # Miscellaneous
    (
        "The package was delivered to the wrong address.",
        "My parcel ended up at someone else's house.",
    ),
    (
        "I can't find my glasses anywhere.",
        "My glasses have disappeared and I have looked everywhere.",
    ),
    (
        "The puzzle has a thousand pieces and took us a week.",
        "It took us a week to finish the thousand piece jigsaw.",
    ),
    (
        "The elevator is out of order, so take the stairs.",
        "The lift is broken; please use the staircase.",
    ),
    (
        "He answered every question in the quiz correctly.",
        "He got all the quiz answers right.",
    ),
    (
        "Please turn off the lights when you leave the room.",
        "Switch the lights off as you go out of the room.",
    ),
]

# Flattened so that each sentence's paraphrase sits next to it.
SENTENCES: list[str] = [sentence for pair in PARAPHRASES for sentence in pair]
