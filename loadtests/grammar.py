"""A small random grammar of English across topics, for the load-test corpus (stdlib only).

`sentence(rng, topic)` expands one sentence of a topic, `fragment(rng, topic)` a 2-7 word
snippet. Rules are alternatives separated by ``|``; ``{name}`` expands rule ``name`` (or a
number slot in `_NUMBERS`), ``{?name}`` does so half the time. Output depends only on the
`random.Random` passed in, so a seeded generator always writes the same texts.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Collection

TOPICS = ("review", "support", "news", "question", "code", "notes", "science")


def _rules(**rules: str) -> dict[str, tuple[str, ...]]:
    return {
        name: tuple(" ".join(alt.split()) for alt in body.split("|") if alt.strip())
        for name, body in rules.items()
    }


RULES = _rules(
    # -- shared vocabulary -------------------------------------------------------------------
    name="""Alice | Priya | Wei | Fatima | José | Zoë | Søren | Chiara | Kwame | Aiko | Mateo |
        Olga | Łukasz | Amélie | Björn | Siobhán | Ravi | Hana | Tomás | Ingrid | Yusuf | Mei |
        Dmitri | Leila | Noah | Emma | Oliver | Sofia | Arjun | Grace | Jamal | Elif | Hiroshi |
        Ana | Pedro | Renée | Malik | Camille | Inês | Thandiwe | Marcus | Nadia | Kenji | Lucía""",
    surname="""Okafor | García | Müller | Nakamura | Kowalski | Smith | Haddad | Lindqvist | Rossi |
        O'Brien | Nguyen | Patel | Dubois | Andersen | Silva | Cohen | Ivanova | Takahashi |
        Mensah | Fernández | Novak | Schmidt | Kim | Jensen | Abara | Moreau | Costa""",
    city="""Lisbon | Zürich | São Paulo | Kraków | Nairobi | Osaka | Montréal | Reykjavík | Austin |
        Manchester | Lagos | Bengaluru | Hanoi | Melbourne | Vancouver | Porto | Seville |
        Gdańsk | Bogotá | Tallinn | Marseille | Denver | Dublin | Cape Town | Istanbul | Seoul |
        Helsinki | Auckland | Chicago | Lyon | Málaga | Accra | Valparaíso | Kyoto | Glasgow""",
    region="""the northern provinces | the coast | the valley | the east of the country |
        the mountain districts | the capital region | several southern counties | the islands""",
    weekday="Monday | Tuesday | Wednesday | Thursday | Friday | Saturday | Sunday",
    month="""January | February | March | April | May | June | July | August | September |
        October | November | December""",
    season="spring | summer | autumn | winter",
    small="two | three | four | five | six | seven | eight | ten | twelve",
    duration="""{small} days | {small} weeks | a month | {small} months | a year | an hour |
        {n2} minutes | a fortnight | most of the afternoon""",
    time_ago="""last week | two months ago | in {month} | over the holidays | yesterday |
        a year ago | on Black Friday | back in {year} | during the {season} sale""",
    company="""Northwind | Acme Corp | Globex | Initech | Umbrella Analytics | Blue Harbor Foods |
        Vertex Labs | Helios Energy | Pinecrest Bank | Orbital Freight | Kestrel Software |
        Lumen Health | Riverside Dairy | Fjord Mobility | Sable & Finch""",
    # -- product reviews ---------------------------------------------------------------------
    product="""blender | pair of hiking boots | set of wireless headphones | standing desk |
        coffee grinder | robot vacuum | e-reader | rice cooker | backpack | mechanical keyboard |
        electric toothbrush | air fryer | tent | office chair | smartwatch | phone case |
        desk lamp | kettle | monitor | router | yoga mat | cast-iron skillet | winter jacket |
        bluetooth speaker | dishwasher | lawn mower | stroller | water bottle | cordless drill |
        sofa | espresso machine | suitcase | webcam | mattress | pressure cooker""",
    feature="""battery life | build quality | sound | screen | packaging | price | setup | app |
        noise level | fit | stitching | handle | lid | charging cable | instructions | warranty |
        zipper | display | motor | finish | cushioning | grip | firmware | remote | hinge""",
    good="""excellent | solid | surprisingly good | sturdy | comfortable | intuitive | reliable |
        well made | quiet | responsive | gorgeous | compact | generous | crisp | smooth |
        thoughtfully designed | easy to clean | lighter than expected""",
    bad="""flimsy | disappointing | noisy | awkward | confusing | overpriced | fragile | sluggish |
        cheap | inconsistent | loud | dull | scratchy | leaky | unreliable | hard to clean""",
    verdict="""it has been {good} so far | I regret it already | it stopped working after
        {duration} | I use it every single day | it is better than I hoped | it feels {bad} |
        my whole family has been fighting over it""",
    stars="★★★★★ | ★★★★☆ | ★★★☆☆ | ★★☆☆☆ | ★☆☆☆☆ | 5/5 | 4/5 | 3 out of 5 | 2/5 | 1 star",
    relative="wife | husband | partner | teenage son | daughter | flatmate | mother | grandfather",
    review="""I bought this {product} {time_ago}, and {verdict}. |
        The {feature} is {good}, but the {feature} feels {bad}. |
        {stars} — the {feature} is {good} and the {feature} is {good}. |
        After {duration} of daily use, the {feature} {wear}. |
        My {relative} {relative_verb} it, which says a lot. |
        Compared to my old {product}, this one is {comparison}. |
        Shipping took {small} days and the box arrived {box_state}. |
        If you {use_case}, {recommendation}. |
        Customer service replied within {duration} and {service_result}. |
        For {price} I expected a {good} {feature}, not something this {bad}. |
        Honestly, the {feature} alone makes it worth {price}. |
        It does exactly what it says: {does_what}. |
        Would I buy it again? {buy_again} |
        {stars}. {?opener} The {feature} {wear}, and I {feeling}. |
        Returned it after {duration} because the {feature} was {bad}.""",
    wear="""still looks new | started peeling | has held up fine | began to rattle |
        lost about {pct} of its capacity | wobbles a little | works as well as on day one""",
    relative_verb="""hates | borrowed | stole | complains about | now wants one too of | loves""",
    comparison="""twice as fast | much quieter | a bit heavier | far easier to carry |
        worse in every way that matters | about the same but cheaper | a real upgrade""",
    box_state="""crushed | soaking wet | perfectly intact | with a missing screw | two days early |
        with somebody else's invoice inside""",
    use_case="""cook for a big family | travel a lot | work from home | live in a small flat |
        have a dog that sheds | commute by bike | game late at night | camp in the rain""",
    recommendation="""this is an easy recommendation | look elsewhere | get the larger model |
        wait for it to go on sale | buy two | skip the extended warranty""",
    service_result="""sent a replacement part for free | asked me to film a video of the fault |
        refunded {price} without questions | never followed up | blamed the courier""",
    does_what="""it keeps drinks cold for {n2} hours | it boils a litre in under {small} minutes |
        it charges my phone twice | it folds flat under the bed | it blocks almost all traffic
        noise""",
    buy_again="Absolutely. | Probably not. | Only at half the price. | Yes, in a heartbeat!",
    opener="Long story short: | To be fair, | Update: | Edit: | Okay, so",
    feeling="""can't stop recommending it | feel a bit cheated | am cautiously happy |
        wish I had bought it sooner | expected more from this brand""",
    # -- support tickets ---------------------------------------------------------------------
    support="""Hi, I can't {account_action} since {event}. |
        Order {order} was charged twice on {month} {day}; please refund one of the payments. |
        Error {error_code} appears whenever I try to {app_action}. |
        The {app_page} page has been loading forever since the {version} update. |
        Steps to reproduce: open {app_page}, tap "{button}", then {app_action}. |
        I already tried {fix_tried} and {fix_tried}, but nothing helped. |
        This is urgent: our team of {n2} people cannot {work_action} before the deadline on
        {weekday}. |
        Please escalate ticket {ticket}; it has been open for {duration}. |
        My account email is {email}, in case you need it. |
        Thanks, {name} — the fix worked, you can close this ticket. |
        The invoice for {month} lists {n2} seats, but we only have {small}. |
        Could you confirm whether users on the {plan} plan get {perk}? |
        Since {event}, notifications arrive {n2} minutes late on {platform}. |
        We were promised a callback on {weekday} and nobody called. |
        The export finished, but the CSV has {n3} empty rows and garbled characters like "Ã©".""",
    account_action="""log in | reset my password | change my billing address | download my
        invoices | add a new user | cancel my subscription | update my phone number |
        connect my bank account | switch to annual billing""",
    event="""the last update | I changed my email | we moved offices | your maintenance window |
        my card expired | the migration on {weekday} | I enabled two-factor authentication""",
    app_action="""upload a file larger than {n2} MB | share a folder with a guest | sync my
        calendar | print a shipping label | apply a discount code | export the monthly report""",
    app_page="Settings | Billing | Dashboard | Reports | Team members | Integrations | Inbox",
    button="Save | Continue | Confirm order | Sync now | Retry | Generate report",
    fix_tried="""clearing the cache | reinstalling the app | using another browser | restarting
        the router | logging out and back in | turning off the VPN | waiting a full day""",
    work_action="""send invoices | close the quarter | onboard new clients | ship any orders |
        access the shared drive | run payroll""",
    plan="Free | Starter | Team | Business | Enterprise",
    perk="""priority support | single sign-on | unlimited storage | an audit log | API access |
        a dedicated account manager""",
    platform="Android | iOS | Windows 11 | macOS | the web app | an old iPad",
    # -- news-like sentences -----------------------------------------------------------------
    news="""{Org} said on {weekday} that it would {policy} in {city}, citing {reason}. |
        Officials in {city} expect about {n3} visitors at the {festival} this {season}. |
        Shares of {company} {moved} {pct} after the firm {corp_event}. |
        Heavy {weather} hit {region} on {weekday}, {weather_effect}. |
        The {team} beat the {team} {score} in {city}, their {ordinal} win in a row. |
        A study by researchers in {city} found that {finding}. |
        Voters in {city} will decide in {month} whether to {policy}. |
        {company} plans to hire {n3} {role}s in {city} by {year}. |
        The museum in {city} reopened after a {duration} renovation, with {exhibit}. |
        Inflation {moved} to {pct} in {month}, {inflation_comment}. |
        Train services between {city} and {city} were suspended for {duration} after {incident}. |
        {name} {surname}, {age}, was named chief executive of {company} on {weekday}. |
        The council approved a budget of €{n3} million for {project}.""",
    Org="""The city council | The transport authority | The central bank | A regional hospital
        network | The ministry of health | A local cooperative | The port authority |
        The national weather service | The school board | The energy regulator""",
    policy="""expand night bus services | freeze rents for two years | close three coal plants |
        build {n3} affordable homes | ban cars from the old town | cut the speed limit to 30
        km/h | plant {n3} trees along the river | raise the minimum wage""",
    reason="""rising costs | public pressure | a shortage of staff | new safety data |
        record demand | a court ruling | concerns about air quality""",
    festival="""jazz festival | film festival | book fair | marathon | food market | tech
        conference | lantern parade""",
    moved="rose | fell | jumped | slipped | climbed | dropped sharply",
    corp_event="""reported record quarterly profit | lowered its annual forecast | announced a
        merger | recalled {n3} vehicles | settled a patent dispute | lost a major contract""",
    weather="rain | snow | wind | hail | fog | flooding",
    weather_effect="""closing schools and roads | cutting power to {n3} homes | delaying dozens of
        flights | and more is forecast for the weekend""",
    team="""Harbor City Lions | River Valley Rangers | Northside Comets | Old Town Owls |
        Coastal Falcons | Highland Bears""",
    score="2–1 | 3–0 | 4–3 | 1–0 | 98–91 | 27–24",  # noqa: RUF001 (scores take an en dash)
    ordinal="second | third | fourth | fifth | seventh | tenth",
    finding="""people who walk {n2} minutes a day sleep better | most commuters would pay more for
        faster trains | urban bees are healthier than rural ones | reading on paper improves
        recall | small schools do not cost more per pupil""",
    role="nurse | software engineer | bus driver | data analyst | electrician | teacher",
    exhibit="""a new wing for modern art | a dinosaur skeleton on loan | an interactive science
        floor | free entry on Sundays""",
    inflation_comment="""the lowest level in {small} years | driven mostly by food and energy |
        slightly above what economists expected""",
    incident="""a signal failure | a landslide | a strike by maintenance workers | a fire near
        the tracks""",
    project="""a new tram line | school repairs | a flood barrier | bike lanes on {n2} streets""",
    # -- questions ---------------------------------------------------------------------------
    question="""How do I {task}? | What is the difference between {concept} and {concept}? |
        Why does my {product} {symptom} after {time_ago}? |
        Is it possible to {task} without {resource}? |
        Can anyone recommend a good {place_kind} in {city}? |
        When does the {festival} in {city} usually start? |
        Which {product} would you pick for someone who wants to {use_case}, and why? |
        Does the {plan} plan include {perk}? |
        How long should I {cook} {food} for? |
        Where can I find the annual report for {year}? |
        Is {city} worth visiting in {month}, or is it too crowded? |
        What happens to my data if I cancel before {month} {day}? |
        Has anyone else had trouble trying to {task} on {platform}?""",
    task="""reset my password | export my data to CSV | connect two monitors | bake bread
        without yeast | learn Spanish in six months | migrate a database with no downtime |
        train for a half marathon | grow tomatoes on a balcony | file taxes as a freelancer |
        speed up a slow laptop | remove a red wine stain | negotiate a raise | back up my
        photos | teach a child to ride a bike""",
    concept="""a mortgage | a lease | RAM | storage | latency | throughput | weather | climate |
        a virus | a bacterium | baking soda | baking powder | a stock | a bond | TCP | UDP |
        an embedding | a hash""",
    symptom="""make a grinding noise | overheat | drain so quickly | restart by itself |
        smell like burnt plastic | refuse to turn on""",
    resource="""a credit card | an account | admin rights | a car | internet access |
        any special tools""",
    place_kind="""bakery | bookshop | ramen place | climbing gym | dentist | vegetarian
        restaurant | coworking space""",
    cook="roast | boil | simmer | bake | grill",
    food="""a whole chicken | brown rice | lentils | a loaf of sourdough | salmon fillets |
        sweet potatoes | hard-boiled eggs""",
    # -- code-ish snippets -------------------------------------------------------------------
    code="""`{func}({arg})` returns None when the {thing} is empty. |
        Set `{ENV}={env_value}` and restart the {service}. |
        {exception}: {err_msg} (line {n3} in {file}) |
        SELECT {column}, COUNT(*) FROM {table} WHERE created_at > '{year}-0{digit}-1{digit}'
        GROUP BY {column}; |
        git checkout -b fix/{branch} && git push -u origin fix/{branch} |
        The {service} logs "WARN {log_msg}" every {n2} seconds. |
        Bump {package} from {version} to {version} to fix {bug_kind}. |
        The `{func}` helper times out after {n3} ms under load. |
        curl -s http://127.0.0.1:{port}/{path} -H 'content-type: application/json' |
        for item in {table}: total += item.{column} |
        def {func}(self, {arg}): return self._{thing}[{arg}] |
        Run `make {make_target}` before opening a pull request. |
        Our CI fails on {platform} with exit code {digit}, but passes locally. |
        `{package}=={version}` pins an old {bug_kind}; upgrading fixes it.""",
    func="""parse_config | load_model | fetch_user | normalize_text | compute_score | send_invoice |
        retry_request | embed_batch | flush_cache | resolve_path | validate_token | read_csv""",
    arg="path | user_id | texts | timeout_s | batch | key | retries | payload",
    thing="cache | queue | config | session | buffer | index",
    ENV="""MAX_BATCH_SIZE | LOG_LEVEL | DATABASE_URL | WORKERS | REQUEST_TIMEOUT |
        FEATURE_FLAGS""",
    env_value="32 | DEBUG | 4 | 300 | false | postgres://db:5432/app",
    service="worker | API server | scheduler | proxy | database | search cluster",
    exception="""ValueError | KeyError | TimeoutError | TypeError | RuntimeError |
        ConnectionResetError | UnicodeDecodeError""",
    err_msg="""expected str, got NoneType | 'user_id' not found | invalid literal for int() |
        connection reset by peer | byte 0xe9 in position {n2} | deadline exceeded""",
    file="app.py | utils/io.py | models.py | handlers.py | settings.py",
    column="status | country | plan | user_id | amount | source",
    table="orders | events | users | invoices | sessions",
    branch="login-loop | csv-export | flaky-test | memory-leak | timezone-bug",
    log_msg="""slow query detected | retrying connection | queue depth above threshold |
        certificate expires soon""",
    package="numpy | requests | pydantic | uvicorn | pandas | orjson | httpx",
    bug_kind="""memory leak | race condition | security issue | crash on startup |
        rounding error""",
    path="embed | health | metrics | v1/users | api/orders",
    make_target="lint | test | format | docs",
    # -- notes, recipes, travel, everyday ----------------------------------------------------
    notes="""Meeting moved to {clock} on {weekday}; {name} will bring the {office_thing}. |
        Remember to {chore} before {clock} tomorrow. |
        {name} {surname} joined the {dept} team this week, so say hello! |
        Add {amount} of {ingredient}, stir for {small} minutes, then let it rest. |
        The trail to {landmark} is {trail}, so bring {gear} and plenty of water. |
        Dinner at {name}'s on {weekday}: I'll bring {dish} and something to drink. |
        Flight to {city} leaves at {clock}, gate {gate}; check-in closes {n2} minutes before. |
        Don't forget: the {office_thing} is broken again, call {name} about it. |
        Preheat the oven to {n3} °C and bake for {n2} minutes until golden. |
        We walked along the harbour in {city} and ate {dish} at a tiny place near the station. |
        Shopping list: {ingredient}, {ingredient}, {ingredient} and batteries. |
        Quick reminder that {name}'s birthday is on {month} {day} — card is on my desk.""",
    clock="9:30 | 10:00 | 11:15 | 13:45 | 14:00 | 16:30 | 8 am | noon | 6 pm",
    office_thing="projector | coffee machine | printer | whiteboard markers | spare charger",
    chore="""water the plants | pay the electricity bill | book the dentist | renew the car
        insurance | send the slides | take out the recycling | call the landlord""",
    dept="design | finance | support | data | marketing | platform",
    amount="a pinch | two tablespoons | 200 g | half a cup | a splash | 1 litre",
    ingredient="""flour | olive oil | garlic | lemon juice | fresh basil | soy sauce | butter |
        chickpeas | paprika | oat milk | parmesan | ginger""",
    landmark="""the lighthouse | the old monastery | the waterfall | the summit hut |
        the abandoned mine""",
    trail="steep and rocky | muddy after the rain | well marked | longer than it looks",
    gear="good boots | a rain jacket | a head torch | sun cream | a map",
    dish="""lasagne | a lentil curry | fish tacos | apple crumble | a big salad | dumplings |
        pastéis de nata | shakshuka""",
    gate="A{n2} | B{digit} | C{n2} | D{digit}",
    # -- explanatory / science ---------------------------------------------------------------
    science="""{Concept} describes how {things} behave when {condition}. |
        {definition} |
        Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen. |
        At sea level, water boils at 100 °C, but on a high mountain it boils sooner. |
        A light year is a distance, not a time: roughly 9.46 trillion kilometres. |
        Bees communicate the direction of food through a so-called waggle dance. |
        The average adult human body contains about {n2} litres of blood. |
        Compound interest means you earn interest on interest, so growth speeds up over time. |
        Vaccines train the immune system to recognise a pathogen without causing the disease. |
        Tides are caused mostly by the Moon's gravity pulling on the oceans. |
        An embedding maps a text to a vector, so that similar meanings end up close together.""",
    Concept="Inflation | Evolution | Entropy | Supply and demand | Plate tectonics | Osmosis",
    things="""prices | species | molecules | markets | continents | cells | gases""",
    condition="""temperatures rise | resources are scarce | pressure changes | nobody intervenes |
        the environment shifts slowly""",
    definition="""In simple terms, inflation means a slow rise in prices over time. |
        Put simply, entropy says that disorder tends to increase in a closed system. |
        Osmosis means water moves toward the saltier side of a membrane. |
        A bond is a loan you give to a government or a company in return for interest. |
        Latency is how long one request takes; throughput is how many finish per second.""",
    # -- fragments (2-7 words) ---------------------------------------------------------------
    review_fragment="""Great value for money! | Love this {product}! | Battery life is {good}. |
        Arrived broken. | Not worth {price}. | {stars}, would buy again. | Too {bad} for me. |
        Does the job. | Meh. Expected more. | Five stars, no notes.""",
    support_fragment="""Cannot log in. | Refund still pending. | Order {order} missing. |
        App crashes on {platform}. | Password reset not working. | Error {error_code} again. |
        Still waiting on ticket {ticket}. | Invoice is wrong. | Please call me back.""",
    news_fragment="""{company} shares {moved} {pct}. | Storm hits {city}. | Markets close
        higher. | {team} win {score}. | Rents rise again in {city}. | Strike ends.""",
    question_fragment="""Where is my refund? | Is {city} safe at night? | How does batching
        work? | What time is it in {city}? | Any update? | Why is it so slow? | Open on
        {weekday}?""",
    code_fragment="""`pip install {package}` | Run `make {make_target}` first. | {exception} in
        {func}() | Fix typo in README. | Revert {branch}. | LGTM, merging.""",
    notes_fragment="""Call {name} back. | Buy {ingredient} and {ingredient}. | Lunch at {clock}?
        | Running {n2} minutes late, sorry! | Out of office until {weekday}.""",
    science_fragment="""Water boils at 100 °C. | Light is fast. | Entropy always wins. |
        Cells divide. | Mass bends space.""",
)


def _number(low: int, high: int) -> Callable[[random.Random], str]:
    return lambda rng: str(rng.randint(low, high))


_NUMBERS: dict[str, Callable[[random.Random], str]] = {
    "digit": _number(1, 9),
    "n2": _number(10, 99),
    "n3": _number(100, 999),
    "day": _number(1, 28),
    "age": _number(34, 71),
    "year": _number(2015, 2031),
    "port": _number(8000, 8999),
    "pct": lambda rng: f"{rng.randint(1, 40)}.{rng.randint(0, 9)}%",
    "price": lambda rng: (
        rng.choice(("$", "€", "£")) + f"{rng.randint(9, 899)}.{rng.choice((0, 49, 95, 99)):02d}"
    ),
    "order": lambda rng: f"#{rng.randint(10000, 9999999)}",
    "ticket": lambda rng: f"TCK-{rng.randint(1000, 99999)}",
    "error_code": lambda rng: rng.choice(("E", "ERR-", "0x")) + str(rng.randint(100, 9999)),
    "version": lambda rng: f"{rng.randint(1, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 12)}",
    "email": lambda rng: (
        f"{rng.choice(RULES['name']).lower()}.{rng.randint(1, 99)}@"
        f"{rng.choice(('example.com', 'mail.test', 'corp.example.org'))}"
    ),
}

_SLOT = re.compile(r"\{(\??)(\w+)\}")
_MAX_DEPTH = 8
# "a" before these vowel-initial words stays "a"; before any other vowel it becomes "an".
_A_NOT_AN = ("one", "user", "unit", "usb", "european", "unique", "university", "useful", "uni")


def _expand(rng: random.Random, template: str, depth: int) -> str:
    if depth >= _MAX_DEPTH:
        raise RecursionError(f"grammar nests deeper than {_MAX_DEPTH} in {template!r}")

    def fill(match: re.Match[str]) -> str:
        optional, name = match.groups()
        if optional and rng.random() < 0.5:
            return ""
        if name in _NUMBERS:
            return _NUMBERS[name](rng)
        return _expand(rng, rng.choice(RULES[name]), depth + 1)

    return _SLOT.sub(fill, template)


def _fix_articles(text: str) -> str:
    def article(match: re.Match[str]) -> str:
        a, word = match.group(1), match.group(2)
        if word.lower().startswith(_A_NOT_AN):
            return match.group(0)
        return f"{a}n {word}"

    return re.sub(r"\b([Aa]) ([aeiouAEIOU]\w*)", article, text)


def realise(rng: random.Random, topic: str, template: str) -> str:
    """`template` (one of `topic`'s rules) with every slot filled, tidied and capitalised
    (code snippets keep their case)."""
    text = " ".join(_expand(rng, template, 0).split())
    text = _fix_articles(re.sub(r" ([,.;:?!])", r"\1", text))
    if topic != "code" and text[:1].islower():
        text = text[0].upper() + text[1:]
    return text


def sentence(rng: random.Random, topic: str, avoid: Collection[str] = ()) -> tuple[str, str]:
    """One sentence of `topic` (a snippet, for ``code``) from a template not in `avoid` (when
    one is left); returns ``(template, text)``."""
    choices = [template for template in RULES[topic] if template not in avoid]
    template = rng.choice(choices or RULES[topic])
    return template, realise(rng, topic, template)


def fragment(rng: random.Random, topic: str) -> str:
    """A 2-7 word snippet of `topic`: a headline, a terse review, a short question."""
    rule = f"{topic}_fragment"
    return realise(rng, topic, rng.choice(RULES[rule]))
