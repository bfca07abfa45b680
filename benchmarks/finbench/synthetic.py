"""Synthetic finance conversation data in the schemas of two public datasets, and the identity chats.

Tests, examples and benchmarks need realistic data that works offline, so this module generates rows
shaped like:

* ``winddude/reddit_finance_43_250k``: a Reddit question (``title`` plus
  ``selftext``) with its top comment as the answer (``body``) and score columns.
* ``virattt/financial-qa-10K``: a question, its answer and the 10-K excerpt
  (``context``) that contains the answer.
* the ``intro`` source: short chats in the ``messages`` schema that teach the model who FinSight is.

It is not part of the finsight package: the package ships what this wrote once (``finsight/data/samples/``,
rewritten with ``--samples``), and the benchmarks call :func:`write_synthetic` for their 20,000-conversation
mixture.

Every company in the 10-K style rows is fictional; none of their figures
describe a real business. Generation is deterministic for a given seed (each
call owns its own ``random.Random``), so files and tests are reproducible.

With ``bad_share > 0`` a share of the rows is replaced by rows that a quality
filter must drop (deleted bodies, duplicates, missing fields, ...), mixed
round-robin over the kinds listed in ``REDDIT_BAD_KINDS`` and
``COMPANY_QA_BAD_KINDS``. The first row is always good, so a duplicate row
always has an earlier row to copy.

    python benchmarks/synthetic_data.py --out DIR --rows 20000   # the benchmark mixture
    python benchmarks/synthetic_data.py --samples                 # rewrite finsight/data/samples/*.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import pathlib
import random
import re
import time
from collections.abc import Callable
from typing import NamedTuple

__all__ = [
    "COMPANY_QA_BAD_KINDS",
    "REDDIT_BAD_KINDS",
    "SUBREDDITS",
    "company_qa_rows",
    "intro_conversations",
    "main",
    "reddit_rows",
    "write_samples",
    "write_synthetic",
]

SUBREDDITS: tuple[str, ...] = (
    "personalfinance",
    "financialindependence",
    "investing",
    "stocks",
    "wallstreetbets",
    "Bogleheads",
    "tax",
    "RealEstate",
    "CreditCards",
    "povertyfinance",
)

#: Kinds of bad Reddit rows, in the round-robin order they are injected.
REDDIT_BAD_KINDS: tuple[str, ...] = (
    "deleted",  # body "[deleted]"
    "removed",  # body "[removed]"
    "empty_body",  # body ""
    "whitespace_body",  # body of whitespace only
    "short_body",  # body of one or two words
    "empty_title",  # title ""
    "low_score",  # comment_normalized_score < 0.05 and combined_score < 0
    "duplicate",  # same title, selftext and body as an earlier row, new id
    "body_none",  # body missing (None)
)

#: Kinds of bad 10-K QA rows, in the round-robin order they are injected.
COMPANY_QA_BAD_KINDS: tuple[str, ...] = (
    "empty_answer",  # answer ""
    "whitespace_question",  # question of whitespace only
    "answer_none",  # answer missing (None)
    "question_not_str",  # question is an int
    "duplicate",  # same question, answer and context as an earlier row
    "answer_removed",  # answer "[removed]"
)

_SHORT_BODIES = ("lol", "This.", "Yes", "No.", "Thanks!", "+1", "^ this", "Same here.")
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"
_MAX_TRIES = 25  # redraws allowed to avoid an accidental duplicate of a good row


# ------------------------------------------------------------ formatting and math


def _money(x: float, cents: bool = False) -> str:
    sign = "-" if x < 0 else ""
    return f"{sign}${abs(x):,.2f}" if cents else f"{sign}${abs(x):,.0f}"


def _pct(x: float, digits: int = 1) -> str:
    text = f"{x:.{digits}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text + "%"


def _payment(principal: float, annual_rate_pct: float, months: int) -> float:
    """Level monthly payment of an amortising loan."""
    r = annual_rate_pct / 100 / 12
    if r == 0:
        return principal / months
    return principal * r / (1 - (1 + r) ** -months)


def _annuity_fv(monthly: float, annual_rate_pct: float, years: int) -> float:
    """Future value of monthly contributions compounded monthly."""
    r = annual_rate_pct / 100 / 12
    n = years * 12
    return monthly * n if r == 0 else monthly * ((1 + r) ** n - 1) / r


def _bad_count(n: int, bad_share: float) -> int:
    if not 0.0 <= bad_share <= 1.0:
        raise ValueError(f"bad_share must be within [0, 1], got {bad_share!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    return min(round(n * bad_share), max(n - 1, 0))


def _bad_plan(
    rng: random.Random, n: int, bad_share: float, kinds: tuple[str, ...]
) -> dict[int, str]:
    """Map row index -> bad kind; index 0 always stays good."""
    count = _bad_count(n, bad_share)
    positions = sorted(rng.sample(range(1, n), count)) if count else []
    return dict(zip(positions, itertools.cycle(kinds)))


# ----------------------------------------------------------------- reddit templates

_RedditBuilder = Callable[[random.Random], tuple[str, str, str]]
_REDDIT_BUILDERS: list[tuple[tuple[str, ...], _RedditBuilder]] = []


def _reddit(*subreddits: str) -> Callable[[_RedditBuilder], _RedditBuilder]:
    def register(fn: _RedditBuilder) -> _RedditBuilder:
        _REDDIT_BUILDERS.append((subreddits, fn))
        return fn

    return register


@_reddit("personalfinance", "povertyfinance")
def _emergency_fund(rng: random.Random) -> tuple[str, str, str]:
    expenses = rng.randrange(1500, 6500, 50)
    saved = rng.randrange(500, 12000, 250)
    months = rng.choice([4, 5, 6])
    low, high = expenses * 3, expenses * 6
    title = rng.choice(
        [
            f"My expenses are about {_money(expenses)}/month. How big should my emergency fund be?",
            "Emergency fund: 3 months or 6 months of expenses?",
            f"Is {_money(saved)} enough for an emergency fund?",
        ]
    )
    selftext = rng.choice(
        [
            (
                f"I spend roughly {_money(expenses)} a month on rent, food, insurance and bills. "
                f"I have {_money(saved)} in checking. Job seems stable but layoffs are in the news."
            ),
            (
                f"Monthly essentials are around {_money(expenses)} and I've saved {_money(saved)} so far. "
                "Should I keep building it or start investing?"
            ),
        ]
    )
    covered = saved / expenses
    body = (
        f"The usual guideline is 3 to 6 months of essential expenses, so for you that is roughly "
        f"{_money(low)} to {_money(high)}. Your {_money(saved)} covers about {covered:.1f} months. "
        f"If your income is stable and you have no dependents, the low end is fine; if you are "
        f"self-employed, the only earner, or in a shaky industry, aim for {months} months or more "
        f"({_money(expenses * months)}). Keep it somewhere boring and liquid, like a high-yield "
        "savings account, not in stocks. It is insurance, not an investment. Once it is funded, "
        "send the extra toward any employer match and high-interest debt, then long-term investing."
    )
    return title, selftext, body


@_reddit("personalfinance", "investing", "financialindependence")
def _compound_lump(rng: random.Random) -> tuple[str, str, str]:
    principal = rng.randrange(1000, 60001, 500)
    rate = rng.choice([4, 5, 6, 7, 8, 9, 10])
    years = rng.randrange(5, 41)
    fv = principal * (1 + rate / 100) ** years
    real = principal * ((1 + rate / 100) / 1.03) ** years
    source = rng.choice(
        ["a bonus", "an inheritance", "a tax refund", "a house sale", "my old 401k"]
    )
    title = rng.choice(
        [
            f"If I invest {_money(principal)} once and leave it for {years} years, what does it grow to?",
            f"How does compound interest actually work? {_money(principal)} at {rate}% for {years} years",
            f"ELI5 compounding with {_money(principal)} over {years} years",
        ]
    )
    selftext = rng.choice(
        [
            "",
            (
                f"Got {source} of {_money(principal)}. Assume about {rate}% a year. "
                f"What does that look like after {years} years if I never touch it?"
            ),
        ]
    )
    body = (
        "Compounding means you earn returns on your past returns, not just on the original money. "
        f"The formula is FV = P x (1 + r)^n. Assuming {rate}% a year: "
        f"{_money(principal)} x {1 + rate / 100:.2f}^{years} = about {_money(fv)}, "
        f"so {_money(fv - principal)} of growth on money you only put in once. Two caveats: real "
        f"returns are lumpy rather than a smooth {rate}% every year, and inflation eats part of it. "
        f"At 3% inflation that is closer to {_money(real)} in today's dollars. "
        "The biggest lever is time, which is why starting early matters more than picking the perfect fund."
    )
    return title, selftext, body


@_reddit("personalfinance", "financialindependence", "Bogleheads")
def _compound_monthly(rng: random.Random) -> tuple[str, str, str]:
    monthly = rng.randrange(50, 3001, 25)
    rate = rng.choice([5, 6, 7, 8])
    years = rng.randrange(5, 41)
    age = rng.randrange(18, 50)
    fv = _annuity_fv(monthly, rate, years)
    contributed = monthly * 12 * years
    title = rng.choice(
        [
            f"What happens if I invest {_money(monthly)} a month for {years} years?",
            f"{age} years old, can invest {_money(monthly)}/month. Is it worth it?",
            f"Is {_money(monthly)} a month even enough to matter?",
        ]
    )
    selftext = rng.choice(
        [
            "",
            (
                f"I'm {age} and finally have {_money(monthly)} left over each month. "
                f"Thinking of a broad index fund for the next {years} years."
            ),
        ]
    )
    body = (
        f"It matters a lot. At {rate}% a year compounded monthly, {_money(monthly)} a month for "
        f"{years} years grows to roughly {_money(fv)}. You would have contributed {_money(contributed)}, "
        f"so about {_money(fv - contributed)} comes from growth. Automate the transfer on payday so it "
        "happens without willpower, use a tax-advantaged account first (401k with match, then an IRA), "
        "and raise the amount whenever you get a raise. The returns are not guaranteed and some years "
        "will be negative, but consistency over decades is what does the work."
    )
    return title, selftext, body


@_reddit("investing", "personalfinance", "Bogleheads")
def _rule_of_72(rng: random.Random) -> tuple[str, str, str]:
    rate = rng.choice([2, 3, 4, 4.5, 5, 6, 7, 8, 9, 10, 12])
    amount = rng.randrange(2000, 100001, 1000)
    exact = math.log(2) / math.log(1 + rate / 100)
    title = rng.choice(
        [
            f"How long does it take money to double at {_pct(rate)}?",
            "What is the rule of 72 and is it accurate?",
            f"When would my {_money(amount)} double?",
        ]
    )
    selftext = rng.choice(
        [
            "",
            f"I have {_money(amount)} earning about {_pct(rate)} a year. Someone mentioned the rule of 72.",
        ]
    )
    body = (
        "The rule of 72 is a mental shortcut: divide 72 by the annual return to estimate the years "
        f"it takes to double. At {_pct(rate)} that is 72 / {rate:g} = {72 / rate:.1f} years. The exact "
        f"answer is ln(2) / ln(1 + {rate / 100:g}) = {exact:.1f} years, so the shortcut is close for "
        f"normal rates. Your {_money(amount)} would become about {_money(amount * 2)} in that time and "
        f"{_money(amount * 4)} after roughly {2 * exact:.0f} years. It also works in reverse for costs: "
        "at 3% inflation prices double in about 24 years."
    )
    return title, selftext, body


@_reddit("personalfinance", "financialindependence")
def _employer_match(rng: random.Random) -> tuple[str, str, str]:
    salary = rng.randrange(35000, 180001, 1000)
    match = rng.choice([50, 100])
    cap = rng.choice([3, 4, 5, 6])
    current = rng.choice([0, 1, 2])
    free = salary * cap / 100 * match / 100
    title = rng.choice(
        [
            f"Employer matches {match}% up to {cap}%. Should I contribute more to my 401k?",
            f"Only putting {current}% in my 401k, is that a mistake?",
            "Is the 401k match really worth it if I have debt?",
        ]
    )
    selftext = (
        f"Salary is {_money(salary)}. My company matches {match}% of contributions up to {cap}% of pay. "
        f"I'm currently contributing {current}%."
    )
    body = (
        f"Contribute at least {cap}% so you get the full match. On {_money(salary)}, {cap}% is "
        f"{_money(salary * cap / 100)} a year from you, and the match adds {_money(free)} on top. "
        f"That is an instant {match}% return before any market growth, which beats paying down almost "
        "any debt. Check the vesting schedule, since some matches only become yours after a few years. "
        "After the match, the usual order is high-interest debt, an IRA, then more 401k up to the "
        "annual limit. Because contributions are pre-tax, your paycheck drops by less than the amount "
        "you contribute."
    )
    return title, selftext, body


@_reddit("personalfinance", "Bogleheads", "tax")
def _roth_vs_traditional(rng: random.Random) -> tuple[str, str, str]:
    age = rng.randrange(19, 56)
    income = rng.randrange(28000, 220001, 1000)
    bracket = 12 if income < 60000 else 22 if income < 115000 else 24
    title = rng.choice(
        [
            "Roth or traditional 401k/IRA?",
            f"{age}, making {_money(income)}. Roth or traditional?",
            "How do I decide between Roth and traditional contributions?",
        ]
    )
    selftext = rng.choice(
        [
            "",
            (
                f"I'm {age} and earn {_money(income)} a year. Everyone says Roth when you are young but I "
                "don't really get why."
            ),
        ]
    )
    lean = (
        "That points toward Roth, since your current rate is low."
        if bracket == 12
        else "That is a genuine toss-up, so splitting between both is reasonable."
        if bracket == 22
        else "That usually favors traditional, taking the deduction now."
    )
    body = (
        "The question is whether your tax rate is higher now or in retirement. Traditional gives you "
        "a deduction today and you pay tax on withdrawals; Roth is taxed today and qualified "
        f"withdrawals are tax-free. At {_money(income)} you are probably in about the {bracket}% "
        f"federal bracket. {lean} Other points: Roth IRA contributions (not earnings) can be "
        "withdrawn any time, which adds flexibility; having both buckets lets you manage taxable "
        "income later; and either one beats not saving. Your age matters less than your tax rate."
    )
    return title, selftext, body


@_reddit("investing", "Bogleheads", "stocks")
def _index_vs_picking(rng: random.Random) -> tuple[str, str, str]:
    amount = rng.randrange(1000, 200001, 500)
    stocks = rng.randrange(3, 16)
    pct = rng.choice([80, 85, 88, 90, 92])
    title = rng.choice(
        [
            "Why does everyone here say to just buy index funds?",
            f"Should I pick my own {stocks} stocks or buy an index fund?",
            f"Putting {_money(amount)} to work: stock picking vs index funds",
        ]
    )
    selftext = rng.choice(
        [
            "",
            (
                f"I have {_money(amount)} and a list of {stocks} companies I like. Is it dumb to just buy "
                "those instead of an index fund?"
            ),
        ]
    )
    body = (
        f"Over 15-year periods, roughly {pct}% of actively managed US large-cap funds trail their "
        "index after fees, according to the S&P SPIVA reports. Professionals with research teams "
        f"struggle to beat the market, so a hand-picked portfolio of {stocks} stocks mostly adds "
        "risk without adding expected return. An index fund gives you thousands of companies, "
        "a very low expense ratio and no need to be right about any single one. If picking stocks "
        f"is fun, a common compromise is to keep most of the {_money(amount)} in a broad fund and "
        "use 5-10% as a play account. Track it honestly against the index."
    )
    return title, selftext, body


@_reddit("Bogleheads", "investing", "personalfinance")
def _expense_ratio(rng: random.Random) -> tuple[str, str, str]:
    amount = rng.randrange(10000, 500001, 5000)
    er_high = rng.choice([0.5, 0.65, 0.75, 0.9, 1.0, 1.2])
    er_low = rng.choice([0.03, 0.04, 0.05, 0.1])
    years = rng.choice([10, 15, 20, 25, 30])
    gross = 7.0
    fv_high = amount * (1 + (gross - er_high) / 100) ** years
    fv_low = amount * (1 + (gross - er_low) / 100) ** years
    title = rng.choice(
        [
            f"Is a {_pct(er_high, 2)} expense ratio really that bad?",
            f"My advisor's fund charges {_pct(er_high, 2)}. Does that matter?",
            "How much do expense ratios actually cost over time?",
        ]
    )
    selftext = (
        f"I have {_money(amount)} in a fund with a {_pct(er_high, 2)} expense ratio. A similar index "
        f"fund charges {_pct(er_low, 2)}."
    )
    body = (
        f"It matters more than it looks. The fee is charged every year on the whole balance, so it "
        f"compounds against you. Assuming 7% gross returns for {years} years, {_money(amount)} grows "
        f"to about {_money(fv_low)} at {_pct(er_low, 2)} but only {_money(fv_high)} at "
        f"{_pct(er_high, 2)}. That is {_money(fv_low - fv_high)} lost to fees, with no evidence the "
        "pricier fund will do better. Before switching in a taxable account, check for capital gains "
        "you would realise; inside a 401k or IRA you can switch without tax."
    )
    return title, selftext, body


@_reddit("RealEstate", "personalfinance")
def _mortgage_payment(rng: random.Random) -> tuple[str, str, str]:
    price = rng.randrange(180000, 900001, 5000)
    down_pct = rng.choice([3.5, 5, 10, 15, 20, 25])
    rate = rng.choice([5.5, 5.75, 6.0, 6.25, 6.5, 6.75, 7.0, 7.25, 7.5])
    term = rng.choice([15, 30])
    loan = price * (1 - down_pct / 100)
    pay = _payment(loan, rate, term * 12)
    interest = pay * term * 12 - loan
    title = rng.choice(
        [
            f"What would my monthly payment be on a {_money(price)} house?",
            f"Can someone check my math on a {term}-year mortgage at {_pct(rate, 2)}?",
            f"First home: {_money(price)} with {_pct(down_pct)} down",
        ]
    )
    selftext = (
        f"Looking at a {_money(price)} place, putting {_pct(down_pct)} down, quoted {_pct(rate, 2)} "
        f"on a {term}-year fixed."
    )
    pmi = (
        " With less than 20% down, expect PMI until you reach 20% equity."
        if down_pct < 20
        else ""
    )
    body = (
        f"You would borrow {_money(loan)}. Using the amortisation formula M = P x r / (1 - (1 + r)^-n) "
        f"with r = {rate:g}% / 12 and n = {term * 12} payments, principal and interest come to about "
        f"{_money(pay, cents=True)} a month. Over the full term you would pay roughly {_money(interest)} "
        f"in interest. That is not the whole payment: add property tax, homeowners insurance and any "
        f"HOA, which can easily add several hundred dollars a month.{pmi} A common guideline is to "
        "keep total housing costs under about 28% of gross income."
    )
    return title, selftext, body


@_reddit("RealEstate", "personalfinance")
def _refinance_breakeven(rng: random.Random) -> tuple[str, str, str]:
    balance = rng.randrange(120000, 700001, 5000)
    old_rate = rng.choice([6.5, 6.75, 7.0, 7.25, 7.5, 7.75, 8.0])
    new_rate = old_rate - rng.choice([0.5, 0.75, 1.0, 1.25, 1.5])
    years_left = rng.choice([20, 25, 27, 28, 30])
    costs = rng.randrange(3000, 12001, 250)
    old_pay = _payment(balance, old_rate, years_left * 12)
    new_pay = _payment(balance, new_rate, years_left * 12)
    saving = old_pay - new_pay
    months = costs / saving
    title = rng.choice(
        [
            f"Is it worth refinancing from {_pct(old_rate, 2)} to {_pct(new_rate, 2)}?",
            f"Refinance with {_money(costs)} in closing costs?",
            "How do I calculate the break-even on a refinance?",
        ]
    )
    selftext = (
        f"Balance is {_money(balance)} with {years_left} years left at {_pct(old_rate, 2)}. Lender "
        f"offers {_pct(new_rate, 2)} with {_money(costs)} closing costs."
    )
    body = (
        f"Compare the payments on the same remaining term. At {_pct(old_rate, 2)} your principal and "
        f"interest is about {_money(old_pay, cents=True)}; at {_pct(new_rate, 2)} it would be about "
        f"{_money(new_pay, cents=True)}, saving {_money(saving, cents=True)} a month. Divide the "
        f"closing costs by that: {_money(costs)} / {_money(saving, cents=True)} = about {months:.0f} "
        "months to break even. If you expect to keep the loan well beyond that, refinancing makes "
        "sense. Watch out for resetting to a fresh 30-year term, which lowers the payment but can "
        "raise total interest."
    )
    return title, selftext, body


@_reddit("personalfinance", "RealEstate")
def _fifteen_vs_thirty(rng: random.Random) -> tuple[str, str, str]:
    loan = rng.randrange(150000, 750001, 5000)
    rate30 = rng.choice([6.25, 6.5, 6.75, 7.0, 7.25])
    rate15 = rate30 - rng.choice([0.5, 0.625, 0.75])
    p30 = _payment(loan, rate30, 360)
    p15 = _payment(loan, rate15, 180)
    i30 = p30 * 360 - loan
    i15 = p15 * 180 - loan
    title = rng.choice(
        [
            "15-year or 30-year mortgage?",
            f"{_money(loan)} loan: is the 15-year worth the higher payment?",
        ]
    )
    selftext = f"Borrowing {_money(loan)}. Offered {_pct(rate30, 3)} on a 30-year or {_pct(rate15, 3)} on a 15-year."
    body = (
        f"Run both numbers. The 30-year at {_pct(rate30, 3)} is about {_money(p30, cents=True)} a month "
        f"with {_money(i30)} of total interest. The 15-year at {_pct(rate15, 3)} is about "
        f"{_money(p15, cents=True)} a month with {_money(i15)} of interest. The 15-year saves "
        f"{_money(i30 - i15)} but costs {_money(p15 - p30, cents=True)} more every month. A middle path "
        "is taking the 30-year for flexibility and prepaying when you can, though most people who plan "
        "that never do it. Only choose the 15-year if the payment still leaves room for retirement "
        "savings and an emergency fund."
    )
    return title, selftext, body


@_reddit("CreditCards", "personalfinance")
def _utilization(rng: random.Random) -> tuple[str, str, str]:
    limit = rng.randrange(2000, 40001, 500)
    balance = rng.randrange(300, limit, 50)
    drop = rng.randrange(15, 61)
    util = balance / limit * 100
    title = rng.choice(
        [
            f"Why did my credit score drop {drop} points when I pay in full?",
            f"Credit utilization question: {_money(balance)} on a {_money(limit)} limit",
            f"Score fell {drop} points overnight, did I do something wrong?",
        ]
    )
    selftext = (
        f"Total limits are {_money(limit)} and my statement showed {_money(balance)}. I always pay the "
        "full balance by the due date."
    )
    body = (
        "Scores look at the balance reported on your statement, not whether you paid it in full "
        f"afterwards. {_money(balance)} out of {_money(limit)} is {util:.0f}% utilization. Under 30% "
        "is the usual advice and under 10% scores best. Utilization has no memory, so if you pay "
        "the card down before the statement closes, the next report shows a lower balance and the "
        f"score typically bounces back within a month or two. A {drop}-point swing from utilization is "
        "normal and only matters if you are about to apply for a mortgage or car loan. Asking for a "
        "credit limit increase also lowers the ratio."
    )
    return title, selftext, body


@_reddit("personalfinance", "povertyfinance")
def _avalanche_snowball(rng: random.Random) -> tuple[str, str, str]:
    kinds = rng.sample(
        [
            "credit card",
            "store card",
            "car loan",
            "personal loan",
            "student loan",
            "medical bill",
        ],
        3,
    )
    debts = []
    for kind in kinds:
        debts.append(
            (
                kind,
                rng.randrange(500, 25001, 100),
                rng.choice([0, 4.5, 6.8, 9.9, 14.9, 19.9, 24.9, 29.9]),
            )
        )
    extra = rng.randrange(100, 1501, 50)
    listing = "; ".join(f"{k} {_money(b)} at {_pct(r)}" for k, b, r in debts)
    by_rate = sorted(debts, key=lambda d: (-d[2], d[1]))
    by_balance = sorted(debts, key=lambda d: (d[1], -d[2]))
    title = rng.choice(
        [
            "Debt avalanche or snowball?",
            f"Which debt should I pay off first? Have {_money(extra)} extra a month",
            "Snowball vs avalanche for my situation",
        ]
    )
    selftext = f"My debts: {listing}. I can put {_money(extra)} a month extra beyond the minimums."
    body = (
        "Both methods pay minimums on everything and throw the extra at one debt at a time. "
        f"Avalanche targets the highest interest rate first: {', then '.join(d[0] for d in by_rate)}. "
        "It minimises total interest and is the mathematically best order. Snowball targets the "
        f"smallest balance first: {', then '.join(d[0] for d in by_balance)}. It costs a bit more "
        "but the quick wins keep some people motivated. With your numbers, the interest difference "
        f"depends mostly on how long the {by_rate[0][0]} at {_pct(by_rate[0][2])} lingers. Pick the "
        f"one you will stick with, put the {_money(extra)} on autopay, and stop adding new balances."
    )
    return title, selftext, body


@_reddit("CreditCards", "povertyfinance", "personalfinance")
def _card_interest(rng: random.Random) -> tuple[str, str, str]:
    balance = rng.randrange(800, 20001, 50)
    apr = rng.choice([19.99, 21.99, 22.49, 24.99, 26.99, 27.99, 29.99])
    monthly = balance * apr / 100 / 12
    minimum = max(25, balance * 0.01 + monthly)  # typical: 1% of balance plus interest
    title = rng.choice(
        [
            f"How much is my {_money(balance)} credit card balance actually costing me?",
            f"{_pct(apr, 2)} APR on {_money(balance)}, how bad is this?",
            "Only paying the minimum on my credit card, what am I missing?",
        ]
    )
    selftext = f"I owe {_money(balance)} at {_pct(apr, 2)} APR and have been paying about the minimum."
    body = (
        f"Roughly, {_pct(apr, 2)} APR is {apr / 12:.2f}% a month, so {_money(balance)} costs about "
        f"{_money(monthly, cents=True)} in interest every month, {_money(monthly * 12)} a year if the "
        f"balance stays put. A minimum payment around {_money(minimum)} barely covers that, which is "
        "why minimum payers stay in debt for years. Options: stop using the card, pay as much above "
        "the minimum as you can, look at a 0% balance transfer card (usually a 3-5% fee) if your "
        "credit is decent, or call the issuer and ask for a lower rate. Paying this off is a "
        f"guaranteed {_pct(apr, 2)} return."
    )
    return title, selftext, body


@_reddit("tax", "investing", "stocks")
def _capital_gains(rng: random.Random) -> tuple[str, str, str]:
    gain = rng.randrange(1000, 80001, 250)
    months = rng.randrange(2, 24)
    bracket = rng.choice([12, 22, 24, 32])
    ltcg = 0 if bracket == 12 else 15
    short = months <= 12
    tax_now = gain * bracket / 100
    tax_long = gain * ltcg / 100
    title = rng.choice(
        [
            f"Selling stock I've held {months} months, how is it taxed?",
            f"Short-term vs long-term capital gains on a {_money(gain)} gain",
            "Should I wait to sell to get long-term capital gains?",
        ]
    )
    selftext = f"Up {_money(gain)} on shares bought {months} months ago. I'm in the {bracket}% bracket."
    status = (
        "Held one year or less, that is a short-term gain"
        if short
        else "Held more than one year, that is a long-term gain"
    )
    body = (
        f"{status}. Short-term gains are taxed as ordinary income, so at {bracket}% the federal tax on "
        f"{_money(gain)} would be about {_money(tax_now)}. Long-term gains get lower rates of 0%, 15% "
        f"or 20%; at your income it would likely be {ltcg}%, about {_money(tax_long)}. "
        + (
            f"Waiting until you pass the one-year mark could save around {_money(tax_now - tax_long)}, "
            "but only if the price does not fall by more than that in the meantime. "
            if short
            else "You already qualify for the lower rate. "
        )
        + "State tax may apply on top, and losses you realise in the same year offset gains."
    )
    return title, selftext, body


@_reddit("tax", "investing", "Bogleheads")
def _tax_loss_harvest(rng: random.Random) -> tuple[str, str, str]:
    loss = rng.randrange(500, 40001, 100)
    fund, swap = rng.choice(
        [
            ("a total market fund", "an S&P 500 fund"),
            ("a total market fund", "a large-cap blend ETF"),
            ("an S&P 500 fund", "a total market fund"),
            ("an S&P 500 fund", "a large-cap blend ETF"),
            ("a tech ETF", "a tech ETF that tracks a different index"),
            (
                "an international fund",
                "an international fund that tracks a different index",
            ),
        ]
    )
    carry = max(loss - 3000, 0)
    title = rng.choice(
        [
            "How does tax-loss harvesting work?",
            f"Down {_money(loss)} in {fund}. Should I harvest the loss?",
            "Wash sale rule question",
        ]
    )
    selftext = f"I have an unrealised loss of {_money(loss)} in {fund} in my taxable brokerage account."
    body = (
        f"You sell {fund} at a loss and immediately buy something similar but not substantially "
        f"identical, such as {swap}, so you stay invested. The realised {_money(loss)} loss offsets "
        "capital gains, and up to $3,000 a year of excess loss offsets ordinary income"
        + (
            f"; the remaining {_money(carry)} carries forward to future years. "
            if carry
            else ". "
        )
        + "The wash sale rule disallows the loss if you buy a substantially identical security within "
        "30 days before or after the sale, including in an IRA or through automatic dividend "
        "reinvestment. Harvesting lowers your cost basis, so it defers tax rather than erasing it."
    )
    return title, selftext, body


@_reddit("investing", "stocks", "financialindependence")
def _dividend_yield(rng: random.Random) -> tuple[str, str, str]:
    price = rng.randrange(20, 400)
    dps = round(price * rng.uniform(0.01, 0.065), 2)
    shares = rng.randrange(10, 2001, 10)
    yld = dps / price * 100
    income = dps * shares
    title = rng.choice(
        [
            f"How do I calculate dividend yield on a ${price} stock?",
            f"If I own {shares:,} shares, how much dividend income will I get?",
            "Are dividends free money?",
        ]
    )
    selftext = f"Stock trades at ${price} and pays ${dps:.2f} per share per year. I own {shares:,} shares."
    body = (
        f"Dividend yield is annual dividend / price: ${dps:.2f} / ${price} = {yld:.2f}%. With "
        f"{shares:,} shares you would receive about {_money(income, cents=True)} a year before tax, "
        "usually paid quarterly. Dividends are not free money: on the ex-dividend date the share price "
        "drops by roughly the amount paid, so your total value is unchanged and you owe tax on the "
        "payout in a taxable account. Judge a stock by total return, price change plus dividends, not "
        "by yield alone. A very high yield is often a sign the market expects a cut."
    )
    return title, selftext, body


@_reddit("tax", "investing")
def _qualified_dividends(rng: random.Random) -> tuple[str, str, str]:
    amount = rng.randrange(200, 20001, 50)
    bracket = rng.choice([22, 24, 32])
    days = rng.randrange(10, 200)
    title = rng.choice(
        [
            "What makes a dividend qualified?",
            f"My 1099 shows {_money(amount)} in dividends, are they qualified?",
            f"Held a stock {days} days, are its dividends qualified?",
        ]
    )
    selftext = f"I received {_money(amount)} in dividends this year and I'm in the {bracket}% bracket."
    body = (
        "Qualified dividends are taxed at long-term capital gains rates (0%, 15% or 20%) instead of "
        "your ordinary rate. To qualify, the dividend must come from a US company or a qualified "
        "foreign one, and you must hold the shares more than 60 days during the 121-day window that "
        "starts 60 days before the ex-dividend date. REIT and money market distributions are usually "
        f"non-qualified. On {_money(amount)}, the difference between {bracket}% and 15% is about "
        f"{_money(amount * (bracket - 15) / 100)}. Your 1099-DIV splits the amounts: box 1a is total "
        "ordinary dividends and box 1b is the qualified part."
    )
    return title, selftext, body


@_reddit("investing", "Bogleheads")
def _etf_vs_mutual_fund(rng: random.Random) -> tuple[str, str, str]:
    amount = rng.randrange(500, 150001, 500)
    monthly = rng.randrange(50, 2001, 50)
    title = rng.choice(
        [
            "ETF vs mutual fund, what's the actual difference?",
            f"Investing {_money(amount)}: ETF or the mutual fund version?",
            "Should I use ETFs or mutual funds in my Roth IRA?",
        ]
    )
    selftext = (
        f"I'm putting in {_money(amount)} now and about {_money(monthly)} a month after that. Both "
        "versions of the index fund have similar expense ratios."
    )
    body = (
        "If they track the same index at a similar cost, the difference is mostly mechanics. ETFs "
        "trade like stocks during the day and most brokers allow fractional shares; mutual funds "
        "trade once a day at the closing price and make automatic investing of a fixed dollar "
        f"amount like {_money(monthly)} a month easy. In a taxable account ETFs tend to be more tax "
        "efficient because they rarely distribute capital gains. Inside an IRA or 401k that does not "
        f"matter. For {_money(amount)}, pick whichever your broker makes cheapest and easiest to "
        "automate, and stay consistent."
    )
    return title, selftext, body


@_reddit("investing", "Bogleheads", "personalfinance")
def _bond_rates(rng: random.Random) -> tuple[str, str, str]:
    duration = rng.choice([2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 17])
    change = rng.choice([0.5, 0.75, 1.0, 1.5, 2.0, 2.5])
    holding = rng.randrange(5000, 250001, 1000)
    loss_pct = duration * change
    title = rng.choice(
        [
            "Why did my bond fund lose money when rates went up?",
            f"Bond fund with duration {duration}: what happens if rates rise {_pct(change, 2)}?",
            "Bonds are supposed to be safe, why am I down?",
        ]
    )
    selftext = f"I hold {_money(holding)} in a bond fund with an average duration of about {duration} years."
    body = (
        "Existing bonds pay fixed coupons, so when new bonds offer higher yields, old ones are worth "
        "less. Duration measures that sensitivity: a fund's price moves about duration x change in "
        f"rates, in the opposite direction. With duration {duration}, a {_pct(change, 2)} rise implies a "
        f"drop of roughly {_pct(loss_pct)}, about {_money(holding * loss_pct / 100)} on {_money(holding)}. "
        "The upside is that the fund now reinvests at higher yields, so if you hold at least about "
        f"{duration} years the higher income tends to make up for the price drop. Short-duration or "
        "money market funds have little rate risk but lower expected return."
    )
    return title, selftext, body


@_reddit("personalfinance", "financialindependence", "investing")
def _inflation_power(rng: random.Random) -> tuple[str, str, str]:
    amount = rng.randrange(10000, 500001, 5000)
    inflation = rng.choice([2, 2.5, 3, 3.5, 4, 5])
    years = rng.randrange(5, 36)
    real = amount / (1 + inflation / 100) ** years
    needed = amount * (1 + inflation / 100) ** years
    title = rng.choice(
        [
            f"What will {_money(amount)} be worth in {years} years with inflation?",
            "How do I account for inflation in my savings goal?",
            f"Is keeping {_money(amount)} in cash a bad idea long term?",
        ]
    )
    selftext = f"Assume inflation averages {_pct(inflation)}. Thinking about a {years}-year horizon."
    body = (
        f"Inflation compounds just like returns. At {_pct(inflation)} a year for {years} years, "
        f"{_money(amount)} in cash buys what about {_money(real)} buys today. Put the other way, "
        f"matching today's {_money(amount)} of purchasing power would take about {_money(needed)} in "
        f"{years} years. That is why long-term money needs to earn more than inflation: cash and most "
        "savings accounts roughly keep pace at best, while a diversified stock and bond mix has "
        "historically beaten it over long periods. For goals, plan in today's dollars and use a real "
        "return (nominal minus inflation) in the math."
    )
    return title, selftext, body


@_reddit("financialindependence", "investing", "Bogleheads")
def _real_return(rng: random.Random) -> tuple[str, str, str]:
    nominal = rng.choice([4, 5, 6, 7, 8, 9, 10, 11])
    inflation = rng.choice([2, 2.5, 3, 3.5, 4])
    amount = rng.randrange(10000, 1000001, 10000)
    real = ((1 + nominal / 100) / (1 + inflation / 100) - 1) * 100
    title = rng.choice(
        [
            "Nominal vs real returns, which should I use?",
            f"My portfolio returned {nominal}% but inflation was {_pct(inflation)}. What did I really earn?",
            "How to calculate real return",
        ]
    )
    selftext = f"Portfolio is about {_money(amount)}. Trying to make my projections more realistic."
    body = (
        "Real return is what you earn after inflation. The exact formula is "
        f"(1 + nominal) / (1 + inflation) - 1 = {1 + nominal / 100:.2f} / {1 + inflation / 100:.3f} - 1, "
        f"which gives {real:.2f}%. The shortcut nominal minus inflation gives {nominal - inflation:g}%, "
        f"close enough for planning. On {_money(amount)} that is about {_money(amount * real / 100)} of "
        "real growth in a year. Projecting with real returns keeps the results in today's dollars, so "
        "you can compare them with your current spending. Many FIRE calculators already assume "
        "around 4-5% real for a stock-heavy portfolio."
    )
    return title, selftext, body


@_reddit("personalfinance", "povertyfinance")
def _budget_503020(rng: random.Random) -> tuple[str, str, str]:
    take_home = rng.randrange(1800, 12001, 50)
    rent = rng.randrange(600, max(700, int(take_home * 0.6)), 25)
    title = rng.choice(
        [
            f"How should I budget {_money(take_home)} a month?",
            "Is the 50/30/20 budget realistic?",
            "First budget ever, where do I start?",
        ]
    )
    selftext = (
        f"Take-home pay is {_money(take_home)} a month and rent is {_money(rent)}."
    )
    share = rent / take_home * 100
    body = (
        "The 50/30/20 rule is a starting point: 50% of take-home pay for needs, 30% for wants, 20% for "
        f"savings and debt payoff. On {_money(take_home)} that is {_money(take_home * 0.5)} for needs, "
        f"{_money(take_home * 0.3)} for wants and {_money(take_home * 0.2)} for savings. Rent alone is "
        f"{share:.0f}% of your pay"
        + (
            ", so needs will run over and wants have to shrink. "
            if share > 40
            else ", which leaves room. "
        )
        + "Track a month of actual spending first, then set targets. Pay yourself first by automating "
        "the savings transfer on payday, and keep a small buffer for irregular bills like car repairs."
    )
    return title, selftext, body


@_reddit("personalfinance", "tax", "financialindependence")
def _hsa(rng: random.Random) -> tuple[str, str, str]:
    contrib = rng.randrange(1000, 4151, 50)
    bracket = rng.choice([12, 22, 24, 32])
    years = rng.randrange(10, 36)
    fv = _annuity_fv(contrib / 12, 7, years)
    title = rng.choice(
        [
            "Is an HSA really the best retirement account?",
            f"Should I max my HSA? Can put in about {_money(contrib)} a year",
            "HSA: spend it or invest it?",
        ]
    )
    selftext = f"I have a high-deductible plan, I'm in the {bracket}% bracket and could contribute {_money(contrib)} a year."
    body = (
        "An HSA is the only account with a triple tax advantage: contributions are deductible (and "
        "skip payroll taxes when made through payroll), growth is untaxed, and withdrawals for qualified "
        f"medical expenses are tax-free. At {bracket}%, {_money(contrib)} saves about "
        f"{_money(contrib * bracket / 100)} of federal income tax up front. If you can pay current "
        "medical bills from cash and invest the HSA, keep receipts: you can reimburse yourself years "
        f"later. Invested at 7% for {years} years, {_money(contrib)} a year could grow to about "
        f"{_money(fv)}. You need a qualifying high-deductible health plan to contribute, and after "
        "65 non-medical withdrawals are taxed like a traditional IRA."
    )
    return title, selftext, body


@_reddit("personalfinance", "financialindependence")
def _student_loans_vs_invest(rng: random.Random) -> tuple[str, str, str]:
    balance = rng.randrange(5000, 120001, 500)
    rate = rng.choice([2.75, 3.5, 4.5, 5.5, 6.8, 7.5, 8.05])
    extra = rng.randrange(100, 2001, 50)
    title = rng.choice(
        [
            f"Pay off {_pct(rate, 2)} student loans or invest?",
            f"Have {_money(extra)} extra a month: loans or index funds?",
            "Student loans vs investing, what does the math say?",
        ]
    )
    selftext = f"I owe {_money(balance)} at {_pct(rate, 2)} and have {_money(extra)} extra each month."
    lean = (
        "guaranteed return is lower than the long-run expected return of stocks, so investing wins on average"
        if rate < 5
        else "is close to or above what stocks are expected to earn after inflation, so paying it down is attractive"
    )
    body = (
        f"Paying extra on a {_pct(rate, 2)} loan is a guaranteed {_pct(rate, 2)} return. That "
        f"{lean}. Before either, take any employer match and keep an emergency fund. On "
        f"{_money(balance)}, the interest is about {_money(balance * rate / 100)} in the first year. "
        f"Many people split the {_money(extra)}, for example half to each, which hedges both ways. "
        "If you have federal loans and might use income-driven repayment or forgiveness, check that "
        "first, because extra payments could be wasted."
    )
    return title, selftext, body


@_reddit("personalfinance", "povertyfinance")
def _car_affordability(rng: random.Random) -> tuple[str, str, str]:
    price = rng.randrange(12000, 75001, 500)
    rate = rng.choice([4.9, 5.9, 6.9, 7.9, 8.9, 9.9, 11.9])
    term = rng.choice([36, 48, 60, 72, 84])
    income = rng.randrange(2500, 15001, 100)
    down = price * 0.2
    pay = _payment(price - down, rate, term)
    title = rng.choice(
        [
            f"Can I afford a {_money(price)} car?",
            f"Is {term} months too long for a car loan?",
            f"Car payment check: {_money(price)} at {_pct(rate)}",
        ]
    )
    selftext = f"Gross income is {_money(income)} a month. Dealer quoted {_pct(rate)} for {term} months."
    share = pay / income * 100
    body = (
        "A common guideline is 20/4/10: put 20% down, finance for no more than 4 years, and keep the "
        "total car costs under 10% of gross income. With 20% down "
        f"({_money(down)}), the loan is {_money(price - down)} and at {_pct(rate)} for {term} months the "
        f"payment is about {_money(pay, cents=True)}, which is {share:.1f}% of your gross income before "
        "insurance, fuel and maintenance. "
        + (
            "That term is longer than ideal and you risk owing more than the car is worth. "
            if term > 48
            else ""
        )
        + "Get a pre-approval from a credit union before visiting the dealer and negotiate the price, "
        "not the monthly payment."
    )
    return title, selftext, body


@_reddit("RealEstate", "personalfinance")
def _rent_vs_buy(rng: random.Random) -> tuple[str, str, str]:
    price = rng.randrange(200000, 1200001, 5000)
    rent = rng.randrange(1200, 6001, 50)
    years = rng.randrange(2, 15)
    ratio = price / (rent * 12)
    title = rng.choice(
        [
            "Is renting really throwing money away?",
            f"Rent at {_money(rent)} or buy a {_money(price)} place?",
            "How do I decide between renting and buying?",
        ]
    )
    selftext = f"Similar homes sell for about {_money(price)} and rent for {_money(rent)} a month. I might stay {years} years."
    view = (
        "which usually favors renting"
        if ratio > 20
        else "which usually favors buying"
        if ratio < 15
        else "which is in the gray zone"
    )
    body = (
        "Renting is not throwing money away any more than mortgage interest, property tax, insurance "
        "and maintenance are. A quick check is the price-to-rent ratio: price divided by a year of "
        f"rent. {_money(price)} / {_money(rent * 12)} = {ratio:.1f}, {view}. Time matters too: buying "
        "and selling costs roughly 8-10% of the price, so "
        + (
            f"{years} years is short and tilts toward renting. "
            if years < 5
            else f"{years} years gives you time to spread those costs. "
        )
        + "Run a rent vs buy calculator with your actual numbers and remember the renter should invest "
        "the down payment and any monthly difference."
    )
    return title, selftext, body


@_reddit("investing", "Bogleheads")
def _dca_vs_lump(rng: random.Random) -> tuple[str, str, str]:
    amount = rng.randrange(10000, 500001, 5000)
    months = rng.choice([3, 6, 9, 12, 18, 24])
    title = rng.choice(
        [
            f"Lump sum {_money(amount)} or dollar-cost average over {months} months?",
            "Is DCA better than lump sum investing?",
            f"Just inherited {_money(amount)}, invest all at once?",
        ]
    )
    selftext = (
        f"I have {_money(amount)} in cash for the long term and the market feels high."
    )
    body = (
        "Historically, investing a lump sum right away beat spreading it out about two thirds of the "
        "time, because markets rise more often than they fall and cash waiting on the sidelines "
        f"misses that. Dollar-cost averaging {_money(amount)} over {months} months "
        f"({_money(amount / months)} a month) mainly reduces regret if the market drops right after "
        "you invest. If a big drop would make you panic and sell, DCA over a short, fixed schedule is "
        "a reasonable behavioral choice. Decide the schedule in advance and automate it. Note that "
        "investing each paycheck as it arrives is not really DCA, it is just investing when you have money."
    )
    return title, selftext, body


@_reddit("Bogleheads", "personalfinance", "investing")
def _asset_allocation_age(rng: random.Random) -> tuple[str, str, str]:
    age = rng.randrange(20, 71)
    balance = rng.randrange(5000, 2000001, 5000)
    bonds = max(age - 20, 0)
    title = rng.choice(
        [
            f"{age} years old, what should my stock/bond split be?",
            "How much should I have in bonds?",
            f"Asset allocation at {age} with {_money(balance)}",
        ]
    )
    selftext = f"I'm {age} and have {_money(balance)} invested. Currently 100% stocks."
    body = (
        "There is no single right answer, but rules of thumb help. Age in bonds would be "
        f"{age}% bonds; the more aggressive age minus 20 gives {bonds}% bonds and {100 - bonds}% "
        "stocks. The real question is how much of a drop you can stomach without selling. In 2008 a "
        f"100% stock portfolio fell around 50%, which on {_money(balance)} would be roughly "
        f"{_money(balance / 2)} on paper. If you would hold through that, a high stock share is fine "
        "when retirement is decades away. As you get within 10 years of needing the money, shifting "
        "toward bonds reduces sequence risk. Target-date funds do this automatically."
    )
    return title, selftext, body


@_reddit("financialindependence", "Bogleheads")
def _four_percent(rng: random.Random) -> tuple[str, str, str]:
    expenses = rng.randrange(25000, 150001, 1000)
    saved = rng.randrange(50000, 3000001, 10000)
    number = expenses * 25
    title = rng.choice(
        [
            f"What's my FI number if I spend {_money(expenses)} a year?",
            "How does the 4% rule work?",
            "Is the 4% rule still safe?",
        ]
    )
    selftext = f"Annual spending is about {_money(expenses)} and I have {_money(saved)} invested."
    progress = saved / number * 100
    body = (
        "The 4% rule comes from studies of historical US returns: withdrawing 4% of the starting "
        "portfolio in year one, then adjusting that dollar amount for inflation, survived every "
        "30-year period tested with a balanced portfolio. Inverting it gives the FI number, 25 times "
        f"annual spending: 25 x {_money(expenses)} = {_money(number)}. You are at {_money(saved)}, about "
        f"{progress:.0f}% of the way. For retirements longer than 30 years, many people use 3.25-3.5% "
        "to be safer. Remember taxes and health insurance when estimating spending, and that being "
        "flexible in bad years helps a lot."
    )
    return title, selftext, body


@_reddit("financialindependence", "personalfinance")
def _savings_rate(rng: random.Random) -> tuple[str, str, str]:
    income = rng.randrange(30000, 250001, 1000)
    saved = rng.randrange(max(2000, int(income * 0.05)), int(income * 0.6), 500)
    rate = saved / income * 100
    title = rng.choice(
        [
            "How do you calculate your savings rate?",
            f"Saving {_money(saved)} of {_money(income)}, is that good?",
            "What savings rate do I need to retire early?",
        ]
    )
    selftext = f"Take-home is {_money(income)} and I saved {_money(saved)} last year across all accounts."
    # Years until savings reach 25x spending, starting from zero at 5% real returns.
    s = rate / 100
    years = math.log(1 + 25 * (1 - s) * 0.05 / s) / math.log(1.05)
    body = (
        f"Savings rate is what you save divided by what you earn. On take-home pay: {_money(saved)} / "
        f"{_money(income)} = {rate:.1f}%. Some people use gross income and count the employer match, "
        "which is fine as long as you are consistent. What makes savings rate powerful is that it "
        "works on both sides: saving more also means living on less, which lowers the amount you "
        f"need. At about {rate:.0f}%, and assuming 5% real returns from zero, the time to financial "
        f"independence is about {years:.0f} years. Raising it by even five points makes a visible difference."
    )
    return title, selftext, body


@_reddit("personalfinance", "povertyfinance")
def _hysa(rng: random.Random) -> tuple[str, str, str]:
    balance = rng.randrange(1000, 100001, 500)
    apy = rng.choice([3.8, 4.0, 4.25, 4.35, 4.5, 4.75, 5.0])
    bank = rng.choice([0.01, 0.02, 0.05, 0.1])
    title = rng.choice(
        [
            f"Is a high-yield savings account worth it for {_money(balance)}?",
            f"My bank pays {_pct(bank, 2)} on savings. Should I move my money?",
            "Are online high-yield savings accounts safe?",
        ]
    )
    selftext = (
        f"I keep {_money(balance)} in savings at my big bank earning {_pct(bank, 2)}."
    )
    body = (
        f"At {_pct(apy, 2)} APY, {_money(balance)} earns about {_money(balance * apy / 100)} a year, "
        f"versus {_money(balance * bank / 100, cents=True)} at {_pct(bank, 2)}. Online banks can pay "
        "more because they have no branches. Check that the bank is FDIC insured (or NCUA for credit "
        "unions), which covers up to $250,000 per depositor, per bank, per ownership category. Rates "
        "are variable and follow the Fed, so they can drop. Keep your checking account at your main bank for "
        "bills and link the two so transfers take a day or two. Interest is taxed as ordinary income."
    )
    return title, selftext, body


@_reddit("personalfinance", "investing")
def _treasury_bills(rng: random.Random) -> tuple[str, str, str]:
    amount = rng.randrange(1000, 200001, 1000)
    yld = rng.choice([4.1, 4.3, 4.5, 4.8, 5.1, 5.3])
    state_tax = rng.choice([0, 4, 5, 6.5, 9.3])
    weeks = rng.choice([4, 8, 13, 17, 26, 52])
    title = rng.choice(
        [
            "T-bills vs CDs vs high-yield savings?",
            f"Where to park {_money(amount)} for a few months?",
            f"Are {weeks}-week Treasury bills a good idea?",
        ]
    )
    selftext = f"I have {_money(amount)} I'll need within a year. My state income tax rate is {_pct(state_tax)}."
    interest = amount * yld / 100 * weeks / 52
    body = (
        f"At about {_pct(yld)} annualised, {_money(amount)} in a {weeks}-week bill earns roughly "
        f"{_money(interest)}. Treasury interest is exempt from state and local income tax, which "
        + (
            f"at {_pct(state_tax)} makes a T-bill worth noticeably more than a CD or savings account at the same rate. "
            if state_tax
            else "does not matter in your state, so just compare the rates. "
        )
        + "CDs lock in a rate but charge a penalty to withdraw early; high-yield savings is the most "
        "flexible but its rate floats. Bills can be bought at TreasuryDirect or through a brokerage, "
        "where they can be sold before maturity if needed."
    )
    return title, selftext, body


@_reddit("tax", "personalfinance")
def _tax_refund(rng: random.Random) -> tuple[str, str, str]:
    refund = rng.randrange(300, 8001, 25)
    periods = rng.choice([12, 24, 26, 52])
    title = rng.choice(
        [
            f"Got a {_money(refund)} tax refund, is that good?",
            "Should I change my W-4 to get a smaller refund?",
            f"Why am I getting {_money(refund)} back?",
        ]
    )
    selftext = (
        f"My refund this year is {_money(refund)}. I get paid {periods} times a year."
    )
    body = (
        "A refund means you paid more tax during the year than you owed, so it is your own money "
        f"coming back without interest. {_money(refund)} spread over {periods} paychecks is about "
        f"{_money(refund / periods, cents=True)} per check. If you would rather have that during the "
        "year, update your W-4 with your employer using the IRS Tax Withholding Estimator. Aim close "
        "to zero but do not overshoot: owing a large amount can trigger an underpayment penalty. "
        "Some people like the refund as forced savings, which is fine if you use it deliberately, "
        "for example to fund an IRA or pay down debt."
    )
    return title, selftext, body


# 2024 US federal brackets for single filers (lower bound of each bracket).
_BRACKETS_2024 = (
    (0, 10),
    (11600, 12),
    (47150, 22),
    (100525, 24),
    (191950, 32),
    (243725, 35),
    (609350, 37),
)


def _federal_tax(taxable: float) -> float:
    tax = 0.0
    bounds = [b for b, _ in _BRACKETS_2024] + [math.inf]
    for (low, rate), high in zip(_BRACKETS_2024, bounds[1:]):
        if taxable > low:
            tax += (min(taxable, high) - low) * rate / 100
    return tax


@_reddit("tax", "personalfinance")
def _marginal_rate(rng: random.Random) -> tuple[str, str, str]:
    threshold, rate_hi = rng.choice([(47150, 22), (100525, 24), (191950, 32)])
    rate_lo = dict(_BRACKETS_2024)[max(b for b, _ in _BRACKETS_2024 if b < threshold)]
    gap = rng.randrange(500, 6001, 100)
    before = threshold - gap
    raise_ = rng.randrange(gap + 1000, gap + 15001, 500)
    after = before + raise_
    extra = _federal_tax(after) - _federal_tax(before)
    title = rng.choice(
        [
            "Will a raise push me into a higher tax bracket and lower my take-home?",
            f"Getting a {_money(raise_)} raise, will I lose money to taxes?",
            "Marginal vs effective tax rate explained?",
        ]
    )
    selftext = f"Taxable income is about {_money(before)} and I'm being offered a {_money(raise_)} raise. Single filer."
    body = (
        "No. US brackets are marginal: each rate applies only to the income inside that bracket. "
        f"Using 2024 single brackets, the {rate_hi}% rate starts at {_money(threshold)}. Going from "
        f"{_money(before)} to {_money(after)} of taxable income, {_money(threshold - before)} of the "
        f"raise is taxed at {rate_lo}% and {_money(after - threshold)} at {rate_hi}%, about "
        f"{_money(extra)} of extra federal tax. You keep roughly {_money(raise_ - extra)} before payroll "
        "and state taxes. Your effective rate, total tax divided by income, is always lower than your "
        f"top bracket: {_federal_tax(after) / after * 100:.1f}% on {_money(after)}."
    )
    return title, selftext, body


@_reddit("tax", "stocks", "personalfinance")
def _rsu_tax(rng: random.Random) -> tuple[str, str, str]:
    shares = rng.randrange(20, 2001, 10)
    price = rng.randrange(15, 500)
    bracket = rng.choice([24, 32, 35])
    value = shares * price
    title = rng.choice(
        [
            "How are RSUs taxed?",
            f"{shares:,} RSUs just vested at ${price}, what do I owe?",
            "Why do I owe tax on RSUs I haven't sold?",
        ]
    )
    selftext = (
        f"{shares:,} shares vested at ${price}. My marginal bracket is {bracket}%."
    )
    body = (
        "RSUs are taxed as ordinary income when they vest, at their market value that day, whether or "
        f"not you sell. {shares:,} x ${price} = {_money(value)} of wages on your W-2. Employers usually "
        "withhold federal tax at the 22% supplemental rate by selling some shares, but at a "
        f"{bracket}% bracket you would owe about {_money(value * (bracket - 22) / 100)} more at tax "
        "time. Your cost basis becomes the vest price, so selling right away creates little or no "
        "extra gain. Many people sell at vest and diversify, since holding is the same as choosing to "
        "buy your employer's stock with cash."
    )
    return title, selftext, body


@_reddit("stocks", "investing")
def _pe_ratio(rng: random.Random) -> tuple[str, str, str]:
    price = rng.randrange(10, 600)
    eps = round(price / rng.uniform(6, 60), 2)
    pe = price / eps
    title = rng.choice(
        [
            "What does P/E ratio actually tell you?",
            f"Stock at ${price} with EPS of ${eps:.2f}, is it cheap?",
            "Is a low P/E stock a good buy?",
        ]
    )
    selftext = (
        f"The stock trades at ${price} and trailing twelve-month EPS is ${eps:.2f}."
    )
    body = (
        f"P/E is price divided by earnings per share: ${price} / ${eps:.2f} = {pe:.1f}. Flip it and "
        f"the earnings yield is {100 / pe:.1f}%. It tells you how many dollars investors pay for each "
        "dollar of current earnings, which reflects expected growth and risk. A low P/E can mean "
        "value or it can mean the market expects earnings to fall; a high one can mean fast growth "
        "or hype. Compare it with the company's own history, its peers, and the forward P/E based on "
        "expected earnings. It means little for companies with tiny or negative earnings."
    )
    return title, selftext, body


@_reddit("personalfinance", "stocks", "investing")
def _concentration(rng: random.Random) -> tuple[str, str, str]:
    total = rng.randrange(50000, 2000001, 5000)
    pct = rng.randrange(20, 91)
    position = total * pct / 100
    source = rng.choice(
        [
            "my employer's stock",
            "one tech stock",
            "shares from an ESPP",
            "a stock my dad left me",
        ]
    )
    title = rng.choice(
        [
            f"{pct}% of my net worth is in one stock. Should I diversify?",
            f"Too much in {source}?",
            "How do I diversify out of a single stock without a huge tax bill?",
        ]
    )
    selftext = f"About {_money(position)} of my {_money(total)} portfolio is {source}."
    body = (
        f"{pct}% in a single company is a lot of risk. Individual stocks can drop 50% or more and "
        f"stay down; at that weight a halving would cost about {_money(position / 2)}. If it is your "
        "employer, your paycheck depends on the same company. Ways to reduce it: sell lots with "
        "the highest cost basis or losses first, spread sales across tax years, sell shares held over "
        "a year for long-term rates, redirect new money and dividends elsewhere, or donate "
        "appreciated shares if you give to charity. A common target is no single stock above 5-10%."
    )
    return title, selftext, body


@_reddit("wallstreetbets", "stocks")
def _call_option(rng: random.Random) -> tuple[str, str, str]:
    strike = rng.randrange(20, 800, 5)
    premium = round(rng.uniform(0.5, 25), 2)
    contracts = rng.randrange(1, 21)
    days = rng.choice([3, 7, 14, 30, 45, 60])
    cost = premium * 100 * contracts
    title = rng.choice(
        [
            f"Bought {contracts} calls at ${strike} strike, when do I make money?",
            "How do call options work? I lost money even though the stock went up",
            f"{days} DTE calls, what's my breakeven?",
        ]
    )
    selftext = (
        f"{contracts}x ${strike}c expiring in {days} days, paid ${premium:.2f} per contract. "
        "Stock went up and my calls are still red."
    )
    body = (
        "Each contract covers 100 shares, so you paid "
        f"${premium:.2f} x 100 x {contracts} = {_money(cost, cents=True)}. At expiration you "
        f"break even only if the stock is above strike plus premium: ${strike} + ${premium:.2f} = "
        f"${strike + premium:.2f}. Before expiry the price of the option also depends on time left and "
        "implied volatility: time decay (theta) eats value every day, and IV usually drops after "
        "earnings, so a small move up can still lose money. Your maximum loss is the "
        f"{_money(cost, cents=True)} you paid. Only trade options with money you can afford to lose."
    )
    return title, selftext, body


@_reddit("wallstreetbets", "investing")
def _margin(rng: random.Random) -> tuple[str, str, str]:
    equity = rng.randrange(5000, 200001, 1000)
    borrowed = rng.randrange(1000, equity, 500)
    rate = rng.choice([6.5, 7.5, 8.5, 9.5, 10.5, 11.5, 12.5])
    maintenance = rng.choice([25, 30, 35])
    total = equity + borrowed
    # Price drop at which equity / total value hits the maintenance requirement.
    drop = 1 - borrowed / (total * (1 - maintenance / 100))
    title = rng.choice(
        [
            "Is buying on margin worth it?",
            f"Using {_money(borrowed)} of margin, when do I get a margin call?",
            f"{_pct(rate)} margin rate, does leverage make sense?",
        ]
    )
    selftext = f"I have {_money(equity)} of my own money and borrowed {_money(borrowed)} on margin at {_pct(rate)}."
    body = (
        f"Margin amplifies both directions. You control {_money(total)} with {_money(equity)}, and pay "
        f"about {_money(borrowed * rate / 100)} a year in interest at {_pct(rate)}, so the investments "
        "must beat that rate just to break even on the borrowed part. With a "
        f"{maintenance}% maintenance requirement, a drop of about {drop * 100:.0f}% in the portfolio "
        "triggers a margin call, and the broker can sell your positions at the worst time without "
        "asking. For long-term investors the expected gain rarely justifies the risk of being forced "
        "out near a bottom."
    )
    return title, selftext, body


@_reddit("Bogleheads", "investing")
def _rebalance(rng: random.Random) -> tuple[str, str, str]:
    target = rng.choice([60, 70, 75, 80, 90])
    stocks = rng.randrange(20000, 900001, 1000)
    bonds = rng.randrange(5000, 400001, 1000)
    total = stocks + bonds
    want = total * target / 100
    move = stocks - want
    title = rng.choice(
        [
            f"How do I rebalance to {target}/{100 - target}?",
            "How often should I rebalance?",
            "Rebalancing math check",
        ]
    )
    selftext = (
        f"Target is {target}% stocks / {100 - target}% bonds. I have {_money(stocks)} in stocks and "
        f"{_money(bonds)} in bonds."
    )
    action = (
        f"sell about {_money(move)} of stocks and buy bonds"
        if move > 0
        else f"move about {_money(-move)} from bonds into stocks"
    )
    body = (
        f"Your total is {_money(total)}, so {target}% stocks is {_money(want)}. You currently have "
        f"{_money(stocks)} in stocks ({stocks / total * 100:.1f}%), so you would {action}. Do it inside "
        "tax-advantaged accounts where possible, since trades there are not taxable, or direct new "
        "contributions toward the underweight side. Common approaches are rebalancing once a year or "
        "whenever an asset class drifts more than 5 percentage points from target. Frequent "
        "rebalancing adds little and can add costs."
    )
    return title, selftext, body


@_reddit("personalfinance", "povertyfinance")
def _sinking_fund(rng: random.Random) -> tuple[str, str, str]:
    goal = rng.randrange(600, 30001, 100)
    months = rng.randrange(3, 37)
    what = rng.choice(
        [
            "a car repair fund",
            "a vacation",
            "holiday gifts",
            "a wedding",
            "a new laptop",
            "moving costs",
        ]
    )
    title = rng.choice(
        [
            f"How much should I save each month for {what}?",
            "What is a sinking fund?",
            f"Saving {_money(goal)} in {months} months",
        ]
    )
    selftext = f"I want {_money(goal)} for {what} in {months} months and hate using credit cards for it."
    body = (
        "A sinking fund is money set aside in advance for a known future expense, so it does not hit "
        f"your budget or a credit card all at once. Divide the goal by the months: {_money(goal)} / "
        f"{months} = {_money(goal / months, cents=True)} a month. Automate the transfer to a separate "
        "savings account or bucket named for the goal so you are not tempted to spend it. Money needed "
        "within a few years should stay in cash or a high-yield savings account, not stocks. People "
        "often keep several sinking funds at once for insurance premiums, car maintenance and gifts."
    )
    return title, selftext, body


@_reddit("personalfinance", "CreditCards")
def _apr_vs_apy(rng: random.Random) -> tuple[str, str, str]:
    apr = rng.choice([3.9, 4.5, 5.0, 12.0, 18.0, 21.9, 24.9, 29.9])
    balance = rng.randrange(1000, 50001, 500)
    apy = ((1 + apr / 100 / 12) ** 12 - 1) * 100
    title = rng.choice(
        [
            "What's the difference between APR and APY?",
            f"{_pct(apr)} APR compounded monthly, what is the APY?",
            "Why do banks advertise APY but cards show APR?",
        ]
    )
    selftext = f"Trying to understand what {_pct(apr)} APR means on {_money(balance)}."
    body = (
        "APR is the simple annual rate. APY includes the effect of compounding within the year. "
        f"With monthly compounding, APY = (1 + APR/12)^12 - 1 = (1 + {apr / 100:.3f}/12)^12 - 1 = "
        f"{apy:.2f}%. On {_money(balance)} held for a year, that is about {_money(balance * apy / 100, cents=True)} "
        f"instead of {_money(balance * apr / 100, cents=True)} at the plain APR. Banks quote APY on "
        "savings because it is the bigger number, and lenders quote APR on loans for the same reason. "
        "Credit cards actually compound daily, so the effective cost is a little higher still."
    )
    return title, selftext, body


@_reddit("CreditCards")
def _annual_fee(rng: random.Random) -> tuple[str, str, str]:
    fee = rng.choice([95, 150, 250, 325, 395, 550, 695])
    spend = rng.randrange(5000, 80001, 500)
    rate = rng.choice([2, 3, 4, 5])
    base = rng.choice([1.5, 2])
    earned = spend * rate / 100
    base_earned = spend * base / 100
    title = rng.choice(
        [
            f"Is a ${fee} annual fee card worth it?",
            f"Spend about {_money(spend)} a year, should I get a premium card?",
            f"{rate}% rewards card with ${fee} fee vs {_pct(base)} no-fee card",
        ]
    )
    selftext = f"I spend around {_money(spend)} a year in the card's bonus categories and always pay in full."
    net = earned - fee
    verdict = (
        "the fee card comes out ahead" if net > base_earned else "the no-fee card wins"
    )
    body = (
        f"Compare net rewards. At {rate}% on {_money(spend)} you earn {_money(earned)}, minus the "
        f"${fee} fee = {_money(net)}. A {_pct(base)} no-fee card earns {_money(base_earned)} on the same "
        f"spending. So {verdict}, before counting credits and perks. Only count credits you would use "
        "anyway, at the value you would actually pay for them. Rewards only make sense if you pay "
        "the balance in full every month; one month of interest wipes out a year of points. Reassess "
        "before each renewal and ask for a retention offer or a product change if it no longer fits."
    )
    return title, selftext, body


@_reddit("CreditCards", "personalfinance")
def _balance_transfer(rng: random.Random) -> tuple[str, str, str]:
    balance = rng.randrange(1500, 25001, 100)
    apr = rng.choice([21.99, 24.99, 27.99, 29.99])
    fee_pct = rng.choice([3, 4, 5])
    months = rng.choice([12, 15, 18, 21])
    fee = balance * fee_pct / 100
    interest = balance * apr / 100 * months / 12
    title = rng.choice(
        [
            f"Is a 0% balance transfer worth a {fee_pct}% fee?",
            f"Moving {_money(balance)} to a {months}-month 0% card",
            "How do balance transfers work?",
        ]
    )
    selftext = f"I owe {_money(balance)} at {_pct(apr, 2)}. Approved for 0% for {months} months with a {fee_pct}% transfer fee."
    body = (
        f"The fee is {fee_pct}% of {_money(balance)} = {_money(fee)}, charged up front. Staying at "
        f"{_pct(apr, 2)} for {months} months would cost very roughly {_money(interest)} in interest "
        "if the balance did not shrink, so the transfer is usually worth it. To pay it off within the "
        f"promo you need about {_money((balance + fee) / months, cents=True)} a month. Do not use the new "
        "card for purchases unless they are also at 0%, and check what rate applies after the promo. "
        "Most importantly, do not run the old card back up."
    )
    return title, selftext, body


@_reddit("RealEstate", "personalfinance")
def _pmi(rng: random.Random) -> tuple[str, str, str]:
    price = rng.randrange(150000, 800001, 5000)
    down_pct = rng.choice([3, 5, 8, 10, 12, 15])
    pmi_rate = rng.choice([0.3, 0.5, 0.7, 0.9, 1.1])
    loan = price * (1 - down_pct / 100)
    monthly = loan * pmi_rate / 100 / 12
    title = rng.choice(
        [
            "How do I get rid of PMI?",
            f"Buying with {down_pct}% down, how long will I pay PMI?",
            "Is PMI worth it to buy sooner?",
        ]
    )
    selftext = f"Price {_money(price)}, {down_pct}% down, lender says PMI is about {_pct(pmi_rate)} a year."
    body = (
        "Private mortgage insurance protects the lender on conventional loans with less than 20% down. "
        f"At {_pct(pmi_rate)} a year on a {_money(loan)} loan it is about {_money(monthly, cents=True)} a "
        "month. You can ask the lender to cancel it once the balance reaches 80% of the original home "
        f"value ({_money(price * 0.8)}), and it must end automatically at 78%. Extra principal payments "
        "get you there sooner, and if the home has appreciated, a new appraisal may allow earlier "
        "removal. FHA loans work differently: their mortgage insurance often lasts for the life of the loan."
    )
    return title, selftext, body


@_reddit("RealEstate", "investing")
def _cap_rate(rng: random.Random) -> tuple[str, str, str]:
    price = rng.randrange(120000, 1500001, 5000)
    rent = rng.randrange(900, 12001, 50)
    expense_ratio = rng.choice([35, 40, 45, 50])
    noi = rent * 12 * (1 - expense_ratio / 100)
    cap = noi / price * 100
    one_pct = rent / price * 100
    title = rng.choice(
        [
            f"Is this rental a good deal? {_money(price)} renting for {_money(rent)}",
            "How do I calculate cap rate?",
            "Does the 1% rule still work?",
        ]
    )
    selftext = (
        f"Property costs {_money(price)} and should rent for {_money(rent)} a month. "
        f"I estimate expenses at {expense_ratio}% of rent."
    )
    body = (
        f"Gross rent is {_money(rent * 12)} a year. With {expense_ratio}% going to taxes, insurance, "
        f"maintenance, vacancy and management, net operating income is about {_money(noi)}. Cap rate = "
        f"NOI / price = {cap:.1f}%. The 1% rule compares monthly rent with price: {one_pct:.2f}%, "
        + (
            "which passes. "
            if one_pct >= 1
            else "which falls short, common in expensive markets. "
        )
        + "Cap rate ignores financing, so also run cash-on-cash return with your actual mortgage "
        "payment. Compare against local cap rates and be conservative with repairs and vacancy."
    )
    return title, selftext, body


@_reddit("Bogleheads", "investing")
def _three_fund(rng: random.Random) -> tuple[str, str, str]:
    us = rng.choice([40, 45, 50, 55, 60])
    intl = rng.choice([15, 20, 25, 30])
    bonds = 100 - us - intl
    amount = rng.randrange(10000, 1000001, 5000)
    title = rng.choice(
        [
            "What is the three-fund portfolio?",
            f"Three-fund portfolio with {_money(amount)}, is {us}/{intl}/{bonds} reasonable?",
            "Simplest way to invest for retirement?",
        ]
    )
    selftext = f"Planning {us}% US stocks, {intl}% international stocks, {bonds}% bonds with {_money(amount)}."
    body = (
        "The three-fund portfolio is a total US stock market fund, a total international stock fund "
        "and a total bond market fund. It holds thousands of securities for a very low cost and is "
        f"easy to rebalance. With {_money(amount)} at {us}/{intl}/{bonds} you would hold about "
        f"{_money(amount * us / 100)}, {_money(amount * intl / 100)} and {_money(amount * bonds / 100)}. "
        "International is commonly 20-40% of the stock portion, and the bond share should match your "
        "risk tolerance and time horizon. Once a year, rebalance back to target. A single target-date "
        "or balanced fund does the same thing automatically."
    )
    return title, selftext, body


@_reddit("povertyfinance", "CreditCards", "personalfinance")
def _build_credit(rng: random.Random) -> tuple[str, str, str]:
    age = rng.randrange(18, 45)
    deposit = rng.choice([200, 300, 500, 1000])
    score = rng.choice(
        ["no score", "a 540 score", "a 580 score", "a 600 score", "a thin file"]
    )
    title = rng.choice(
        [
            "How do I build credit from nothing?",
            f"{age} with {score}, where do I start?",
            "Is a secured card worth it?",
        ]
    )
    selftext = f"I'm {age} with {score}. I can put down about ${deposit} for a deposit."
    body = (
        f"A secured card is the standard starting point. You put down a deposit, here ${deposit}, "
        "which becomes your limit. Use it for one small recurring bill, let the statement post, and "
        f"pay it in full every month. Keep the reported balance below 10% of the limit, about "
        f"${deposit * 0.1:.0f}. Payment history is the biggest factor in your score, so never pay late. "
        "After 6-12 months many issuers graduate you to an unsecured card and refund the deposit. "
        "Being added as an authorized user on a family member's old, well-managed card can also help. "
        "Avoid credit builder products with high fees."
    )
    return title, selftext, body


@_reddit("personalfinance", "povertyfinance")
def _job_loss(rng: random.Random) -> tuple[str, str, str]:
    savings = rng.randrange(250, 20001, 250)
    expenses = rng.randrange(1500, 6001, 50)
    runway = savings / expenses
    title = rng.choice(
        [
            "Just got laid off, what should I do first?",
            f"Lost my job with {_money(savings)} saved, what now?",
            "Laid off. How do I prioritize bills?",
        ]
    )
    selftext = f"I have {_money(savings)} in savings and monthly expenses around {_money(expenses)}."
    body = (
        f"First, file for unemployment right away; benefits usually are not backdated. Your "
        f"{_money(savings)} covers about {runway:.1f} months at {_money(expenses)}, and you can stretch "
        "that by cutting to essentials now. Pay in this order: housing, utilities, food, "
        "transportation to look for work, then minimum payments on debt. Call lenders before you "
        "miss a payment and ask about hardship programs. Look at health insurance: COBRA is expensive "
        "and a marketplace plan with subsidies is often cheaper after losing income. Avoid cashing out "
        "a 401k unless it is truly the last option, because of taxes and the 10% penalty."
    )
    return title, selftext, body


@_reddit("personalfinance", "financialindependence", "tax")
def _early_withdrawal(rng: random.Random) -> tuple[str, str, str]:
    amount = rng.randrange(5000, 100001, 1000)
    age = rng.randrange(25, 59)
    bracket = rng.choice([12, 22, 24])
    penalty = amount * 0.10
    tax = amount * bracket / 100
    title = rng.choice(
        [
            "Should I withdraw from my 401k to pay off debt?",
            f"Cashing out {_money(amount)} from my 401k at {age}, what does it cost?",
            "401k early withdrawal penalty question",
        ]
    )
    selftext = f"I'm {age}, in the {bracket}% bracket, and thinking of taking {_money(amount)} out of my 401k."
    body = (
        f"Before age 59 and a half, a 401k withdrawal generally costs a 10% penalty ({_money(penalty)}) "
        f"plus ordinary income tax, about {_money(tax)} at {bracket}%, and possibly state tax. That is "
        f"roughly {_money(penalty + tax)} gone, leaving around {_money(amount - penalty - tax)}, and you "
        "lose the future growth. Alternatives: a 401k loan, which you repay to yourself, hardship "
        "options, or negotiating the debt. Exceptions to the penalty exist, such as leaving your "
        "employer in or after the year you turn 55 (the rule of 55). Usually this is a last resort."
    )
    return title, selftext, body


@_reddit("personalfinance", "Bogleheads", "tax")
def _backdoor_roth(rng: random.Random) -> tuple[str, str, str]:
    income = rng.randrange(165000, 450001, 5000)
    pretax_ira = rng.choice([0, 0, 10000, 25000, 60000])
    contrib = 7000
    taxable_share = pretax_ira / (pretax_ira + contrib) * 100 if pretax_ira else 0
    title = rng.choice(
        [
            "How does a backdoor Roth work?",
            f"Making {_money(income)}, can I still use a Roth IRA?",
            "Backdoor Roth and the pro-rata rule",
        ]
    )
    selftext = f"Income is {_money(income)}, over the Roth limit. I have {_money(pretax_ira)} in a traditional IRA."
    note = (
        "With no pre-tax IRA money, the conversion is essentially tax-free. "
        if not pretax_ira
        else f"Because you have {_money(pretax_ira)} of pre-tax IRA money, the pro-rata rule makes about "
        f"{taxable_share:.0f}% of the conversion taxable. Rolling that into a 401k first, if the plan "
        "allows, avoids this. "
    )
    body = (
        "If your income is above the Roth IRA limit, you contribute to a traditional IRA without "
        f"taking a deduction (2024 limit {_money(contrib)}), then convert it to Roth. {note}"
        "File Form 8606 each year to report the nondeductible contribution and the conversion. "
        "Contribute and convert in the same year to keep the paperwork simple, and convert promptly "
        "so there is little growth to tax."
    )
    return title, selftext, body


@_reddit("financialindependence", "tax")
def _rmd(rng: random.Random) -> tuple[str, str, str]:
    balance = rng.randrange(100000, 3000001, 5000)
    divisor = 26.5
    rmd = balance / divisor
    title = rng.choice(
        [
            "How do required minimum distributions work?",
            f"RMD on a {_money(balance)} IRA?",
            "When do RMDs start now?",
        ]
    )
    selftext = f"My parent turns 73 this year with {_money(balance)} in a traditional IRA at the end of last year."
    body = (
        "Required minimum distributions force withdrawals from traditional IRAs and 401ks so the "
        "deferred tax eventually gets paid. Under SECURE 2.0 they start at age 73 for people born "
        "1951-1959. Each year's RMD is the prior December 31 balance divided by a life expectancy "
        f"factor from the IRS Uniform Lifetime Table; at 73 that factor is {divisor}. So "
        f"{_money(balance)} / {divisor} = about {_money(rmd)}. The first RMD may be delayed until "
        "April 1 of the following year, but then two are due that year. Roth IRAs have no RMDs for "
        "the original owner, and missing one triggers an excise tax."
    )
    return title, selftext, body


@_reddit("stocks", "investing", "wallstreetbets")
def _market_drop(rng: random.Random) -> tuple[str, str, str]:
    drop = rng.randrange(5, 36)
    balance = rng.randrange(5000, 1000001, 1000)
    years = rng.randrange(5, 41)
    title = rng.choice(
        [
            f"Market down {drop}%, should I sell everything?",
            f"Portfolio lost {_money(balance * drop / 100)}, I'm panicking",
            "How do you stay calm in a crash?",
        ]
    )
    selftext = f"My {_money(balance)} portfolio is down {drop}% and I don't need the money for {years} years."
    body = (
        f"A {drop}% decline hurts, but it is a normal part of owning stocks: the S&P 500 has had a "
        "10%+ drop in most years and bear markets every few years, yet it has recovered from every one "
        "of them over time. Selling locks in the loss and forces you to guess when to get back in. "
        f"With a {years}-year horizon, you will be buying for years at these lower prices. Things that "
        "help: stop checking daily, keep contributing automatically, rebalance if your allocation "
        "drifted, and harvest losses in taxable accounts. If the swings are unbearable, that is a sign "
        "to hold more bonds once things calm down."
    )
    return title, selftext, body


@_reddit("personalfinance", "investing")
def _first_investment(rng: random.Random) -> tuple[str, str, str]:
    age = rng.randrange(16, 40)
    amount = rng.randrange(100, 20001, 50)
    title = rng.choice(
        [
            f"{age} with {_money(amount)}, how do I start investing?",
            "Complete beginner, where do I put my first money?",
            "What should I invest in first?",
        ]
    )
    selftext = f"I'm {age} and have {_money(amount)} saved. No debt. I don't know anything about investing."
    body = (
        "Start with the basics in order. Make sure you have a small emergency fund and no "
        "high-interest debt. If you have earned income, a Roth IRA at a large low-cost brokerage is a "
        "great first account, and if you are under 18 a parent can open a custodial Roth. Inside it, "
        "buy one broad, low-cost fund: a target-date fund or a total market index fund. "
        f"Put in the {_money(amount)} and keep adding each month. Avoid individual stock tips, options "
        "and crypto until you understand what you own. The most important things are low fees, "
        "diversification and staying invested for decades."
    )
    return title, selftext, body


@_reddit("tax", "personalfinance")
def _side_hustle_tax(rng: random.Random) -> tuple[str, str, str]:
    profit = rng.randrange(1000, 60001, 250)
    se_tax = profit * 0.9235 * 0.153
    title = rng.choice(
        [
            "How are side hustle earnings taxed?",
            f"Made {_money(profit)} freelancing, how much tax will I owe?",
            "Do I need to pay quarterly estimated taxes?",
        ]
    )
    selftext = f"My freelance profit this year is about {_money(profit)} after expenses. I also have a W-2 job."
    body = (
        "Self-employment profit is subject to income tax and self-employment tax, which covers Social "
        "Security and Medicare for both the employee and employer side. Self-employment tax is 15.3% "
        f"of 92.35% of net profit: about {_money(se_tax)} on {_money(profit)}, before income tax. Half of it "
        "is deductible. Track expenses and deduct the legitimate ones on Schedule C. If you will owe "
        "$1,000 or more, make quarterly estimated payments, or raise the withholding at your W-2 job, "
        "which counts as paid evenly through the year. Setting aside 25-30% of each payment is a safe habit."
    )
    return title, selftext, body


# ---------------------------------------------------------------- reddit generation

_OPENERS = (
    "",
    "",
    "",
    "Good question. ",
    "This comes up a lot. ",
    "Happy to help. ",
    "Great question. ",
)
_CLOSERS = (
    "",
    "",
    "",
    " Hope that helps.",
    " Good luck!",
    " Not financial advice, just the math.",
    " The wiki in the sidebar covers this in more detail.",
)


def _reddit_content(rng: random.Random) -> tuple[str, str, str, str]:
    """Draw one (subreddit, title, selftext, body) from a random template."""
    subreddits, build = rng.choice(_REDDIT_BUILDERS)
    title, selftext, body = build(rng)
    if rng.random() < 0.35:  # many real posts are titles only
        selftext = ""
    body = rng.choice(_OPENERS) + body + rng.choice(_CLOSERS)
    return rng.choice(subreddits), title, selftext, body


def _reddit_id(rng: random.Random, used: set[str]) -> str:
    while True:
        rid = "t3_" + "".join(rng.choice(_BASE36) for _ in range(6))
        if rid not in used:
            used.add(rid)
            return rid


def _scores(rng: random.Random, low: bool) -> dict[str, float]:
    if low:
        z = rng.uniform(-3.0, -1.0)
        norm = rng.uniform(0.0, 0.05)
        comment = rng.uniform(0.0, 0.049)
    else:
        z = rng.uniform(-0.5, 4.0)
        norm = rng.uniform(0.1, 1.0)
        comment = rng.uniform(0.15, 1.0)
    # Good rows stay positive (>= 0.075), low rows stay negative (<= -0.05).
    combined = 0.5 * (norm + comment) + 0.1 * z
    return {
        "z_score": round(z, 4),
        "normalized_score": round(norm, 4),
        "comment_normalized_score": round(comment, 4),
        "combined_score": round(combined, 4),
    }


def reddit_rows(n: int, seed: int = 0, bad_share: float = 0.0) -> list[dict]:
    """Generate ``n`` rows shaped like ``winddude/reddit_finance_43_250k``.

    Gives the pipeline an offline stand-in for the Reddit source: keys are
    ``id, title, selftext, body, subreddit, z_score, normalized_score,
    comment_normalized_score, combined_score``. Good rows have a non-empty
    title, a string selftext (often empty), a 40-250 word answer in ``body``
    and positive scores; they are unique by (title, selftext, body). A
    ``bad_share`` of the rows (never the first) is replaced round-robin by the
    kinds in ``REDDIT_BAD_KINDS`` so quality filters can be tested.
    """
    rng = random.Random(seed)
    plan = _bad_plan(rng, n, bad_share, REDDIT_BAD_KINDS)
    used_ids: set[str] = set()
    seen: set[tuple[str, str, str]] = set()
    rows: list[dict] = []
    good: list[int] = []
    for i in range(n):
        kind = plan.get(i)
        if kind == "duplicate":
            rows.append({**rows[rng.choice(good)], "id": _reddit_id(rng, used_ids)})
            continue
        for _ in range(_MAX_TRIES):
            subreddit, title, selftext, body = _reddit_content(rng)
            if (title, selftext, body) not in seen:
                break
        seen.add((title, selftext, body))
        row = {
            "id": _reddit_id(rng, used_ids),
            "title": title,
            "selftext": selftext,
            "body": body,
            "subreddit": subreddit,
            **_scores(rng, low=kind == "low_score"),
        }
        if kind == "deleted":
            row["body"] = "[deleted]"
        elif kind == "removed":
            row["body"] = "[removed]"
        elif kind == "empty_body":
            row["body"] = ""
        elif kind == "whitespace_body":
            row["body"] = rng.choice(["   \n", " ", "\n\n", "\t "])
        elif kind == "short_body":
            row["body"] = rng.choice(_SHORT_BODIES)
        elif kind == "empty_title":
            row["title"] = ""
        elif kind == "body_none":
            row["body"] = None
        elif kind is None:
            good.append(i)
        rows.append(row)
    return rows


# ------------------------------------------------------------- 10-K company profiles


class _Risk(NamedTuple):
    topic: str
    context: str  # first-person, as written in a filing
    answer: str  # third-person clause, completes "<Company> ..."


_RISKS: tuple[_Risk, ...] = (
    _Risk(
        "its suppliers",
        "We depend on a limited number of suppliers for key components, and a disruption in their "
        "operations could delay our shipments and reduce our revenue.",
        "depends on a limited number of suppliers for key components, and a disruption at those "
        "suppliers could delay shipments and reduce revenue",
    ),
    _Risk(
        "cybersecurity",
        "A breach of our information systems could expose confidential customer data, disrupt our "
        "operations and result in litigation and regulatory penalties.",
        "warns that a breach of its information systems could expose customer data, disrupt "
        "operations and lead to litigation and regulatory penalties",
    ),
    _Risk(
        "customer concentration",
        "A small number of customers account for a significant portion of our revenue, and the loss "
        "of any of them could materially harm our results.",
        "notes that a small number of customers account for a significant portion of revenue, so "
        "losing any of them could materially harm results",
    ),
    _Risk(
        "interest rates",
        "Rising interest rates increase our borrowing costs and may reduce demand from customers who "
        "finance their purchases.",
        "says rising interest rates increase its borrowing costs and may reduce demand from "
        "customers who finance purchases",
    ),
    _Risk(
        "foreign currency",
        "A significant portion of our sales is denominated in currencies other than the U.S. dollar, "
        "and a stronger dollar reduces our reported revenue.",
        "notes that much of its sales are in foreign currencies, so a stronger U.S. dollar reduces "
        "reported revenue",
    ),
    _Risk(
        "regulation",
        "Changes in laws and regulations applicable to our industry could increase our compliance "
        "costs and limit the products we are able to offer.",
        "warns that changes in industry laws and regulations could raise compliance costs and "
        "limit the products it can offer",
    ),
    _Risk(
        "competition",
        "We face intense competition, including from larger companies with greater resources, which "
        "could reduce our prices and market share.",
        "faces intense competition from larger companies with greater resources, which could reduce "
        "its prices and market share",
    ),
    _Risk(
        "key personnel",
        "Our success depends on attracting and retaining highly skilled employees, and competition "
        "for such talent is intense.",
        "says its success depends on attracting and retaining highly skilled employees in a "
        "competitive labor market",
    ),
    _Risk(
        "commodity prices",
        "Volatility in the prices of raw materials and energy could increase our costs, and we may "
        "not be able to pass those increases on to customers.",
        "notes that volatile raw material and energy prices could raise costs that it may not be "
        "able to pass on to customers",
    ),
    _Risk(
        "climate and weather",
        "Severe weather events and climate change could damage our facilities, disrupt our supply "
        "chain and increase our insurance costs.",
        "warns that severe weather and climate change could damage facilities, disrupt its supply "
        "chain and raise insurance costs",
    ),
    _Risk(
        "indebtedness",
        "Our level of indebtedness could limit our flexibility to respond to changing business "
        "conditions and require us to use cash flow to service debt.",
        "says its level of debt could limit flexibility and require it to devote cash flow to "
        "servicing debt",
    ),
    _Risk(
        "clinical trials",
        "Our product candidates may fail in clinical trials or fail to receive regulatory approval, "
        "which would prevent us from commercializing them.",
        "warns that its product candidates may fail clinical trials or not receive regulatory "
        "approval, preventing commercialization",
    ),
    _Risk(
        "intellectual property",
        "We may be unable to adequately protect our intellectual property, and third parties may "
        "claim that our products infringe their rights.",
        "may be unable to adequately protect its intellectual property and could face claims that "
        "its products infringe others' rights",
    ),
    _Risk(
        "consumer demand",
        "Our results depend on discretionary consumer spending, which declines during economic "
        "downturns and periods of high inflation.",
        "depends on discretionary consumer spending, which falls during downturns and periods of "
        "high inflation",
    ),
    _Risk(
        "credit losses",
        "Deterioration in the credit quality of our borrowers could increase our provision for "
        "credit losses and reduce our earnings.",
        "warns that weaker borrower credit quality could increase its provision for credit losses "
        "and reduce earnings",
    ),
    _Risk(
        "international operations",
        "Our international operations expose us to political instability, trade restrictions and "
        "tariffs that could increase costs or reduce sales.",
        "says its international operations expose it to political instability, trade restrictions "
        "and tariffs",
    ),
)


class _Company(NamedTuple):
    ticker: str
    name: str
    short: str
    sector: str
    hq: str
    state: str
    founded: int
    fy_end: str  # month and day, e.g. "December 31"
    initial: str  # area of initial focus
    later: str  # what it expanded into
    segments: tuple[str, str, str]
    risks: tuple[int, int, int, int]  # indices into _RISKS
    revenue: float  # fiscal 2023 revenue, $ millions
    growth: float  # typical annual growth, %
    employees: int  # fiscal 2023 headcount
    rd_pct: float  # R&D as % of revenue
    gross_margin: float  # %
    op_margin: float  # %
    dividend: float | None  # quarterly dividend per share, $
    debt: float  # long-term debt, $ millions
    buyback: float | None  # repurchases in fiscal 2023, $ millions
    countries: int
    drivers: tuple[str, str]


# fmt: off
_COMPANIES: tuple[_Company, ...] = (
    _Company(
        ticker="BWSM", name="Brightwater Semiconductor", short="Brightwater", sector="semiconductors",
        hq="San Jose, California", state="Delaware", founded=1994, fy_end="January 28",
        initial="analog power-management chips", later="data center interconnects",
        segments=("Data Center", "Automotive", "Industrial"), risks=(0, 6, 12, 15),
        revenue=6840, growth=18, employees=26196, rd_pct=19.5, gross_margin=61.2, op_margin=28.4,
        dividend=0.08, debt=3200, buyback=1500, countries=38,
        drivers=("higher demand for data center products", "new automotive design wins"),
    ),
    _Company(
        ticker="CLHS", name="Calderon Health Systems", short="Calderon", sector="health care services",
        hq="Nashville, Tennessee", state="Delaware", founded=1987, fy_end="December 31",
        initial="rural community hospitals", later="outpatient surgery centers",
        segments=("Hospital Operations", "Outpatient Services", "Physician Practices"), risks=(5, 1, 7, 10),
        revenue=11420, growth=6, employees=48310, rd_pct=0.0, gross_margin=38.5, op_margin=9.1,
        dividend=0.6, debt=8900, buyback=400, countries=1,
        drivers=("higher patient volumes", "improved payer mix"),
    ),
    _Company(
        ticker="MFHX", name="Meridian Freight Holdings", short="Meridian", sector="logistics",
        hq="Memphis, Tennessee", state="Tennessee", founded=1972, fy_end="December 31",
        initial="regional trucking", later="intermodal and contract logistics",
        segments=("Truckload", "Intermodal", "Logistics Solutions"), risks=(8, 3, 9, 6),
        revenue=5210, growth=4, employees=21870, rd_pct=0.3, gross_margin=24.1, op_margin=7.8,
        dividend=0.29, debt=1450, buyback=250, countries=4,
        drivers=("higher contract rates", "growth in intermodal volumes"),
    ),
    _Company(
        ticker="QLSW", name="Quillon Software", short="Quillon", sector="enterprise software",
        hq="Austin, Texas", state="Delaware", founded=2006, fy_end="January 31",
        initial="payroll software for small businesses", later="human capital management platforms",
        segments=("Subscription", "Professional Services", "Payments"), risks=(1, 6, 7, 12),
        revenue=2380, growth=24, employees=8950, rd_pct=23.8, gross_margin=77.4, op_margin=11.6,
        dividend=None, debt=1150, buyback=None, countries=17,
        drivers=("new customer additions", "higher subscription revenue per customer"),
    ),
    _Company(
        ticker="RFEP", name="Redfern Energy Partners", short="Redfern", sector="oil and gas",
        hq="Houston, Texas", state="Delaware", founded=1961, fy_end="December 31",
        initial="onshore natural gas production", later="liquefied natural gas exports",
        segments=("Upstream", "Midstream", "Marketing"), risks=(8, 5, 9, 10),
        revenue=18750, growth=2, employees=7340, rd_pct=0.6, gross_margin=41.0, op_margin=22.3,
        dividend=0.95, debt=9600, buyback=2000, countries=9,
        drivers=("higher realized natural gas prices", "increased production volumes"),
    ),
    _Company(
        ticker="SLVA", name="Solvara Apparel", short="Solvara", sector="apparel",
        hq="Portland, Oregon", state="Oregon", founded=1989, fy_end="May 31",
        initial="trail running shoes", later="outdoor apparel and equipment",
        segments=("Footwear", "Apparel", "Equipment"), risks=(13, 0, 4, 15),
        revenue=3940, growth=9, employees=14200, rd_pct=1.4, gross_margin=46.8, op_margin=12.9,
        dividend=0.22, debt=1000, buyback=300, countries=46,
        drivers=("strong direct-to-consumer sales", "growth in international markets"),
    ),
    _Company(
        ticker="TRWB", name="Tarrow Biosciences", short="Tarrow", sector="biotechnology",
        hq="Cambridge, Massachusetts", state="Delaware", founded=2011, fy_end="December 31",
        initial="rare genetic liver disorders", later="gene therapies for rare diseases",
        segments=("Product Sales", "Collaboration Revenue", "Royalties"), risks=(11, 12, 7, 5),
        revenue=940, growth=35, employees=2150, rd_pct=68.0, gross_margin=88.1, op_margin=-12.5,
        dividend=None, debt=600, buyback=None, countries=12,
        drivers=("the launch of our first approved therapy", "milestone payments from partners"),
    ),
    _Company(
        ticker="VNTI", name="Vantor Industrial", short="Vantor", sector="industrial machinery",
        hq="Milwaukee, Wisconsin", state="Wisconsin", founded=1908, fy_end="September 30",
        initial="foundry equipment", later="automation and motion control systems",
        segments=("Motion Control", "Fluid Systems", "Aftermarket Services"), risks=(8, 4, 15, 0),
        revenue=7630, growth=5, employees=31400, rd_pct=3.9, gross_margin=34.6, op_margin=15.2,
        dividend=0.47, debt=2700, buyback=600, countries=54,
        drivers=("pricing actions", "higher aftermarket demand"),
    ),
    _Company(
        ticker="HLCF", name="Halcyon Foods", short="Halcyon", sector="packaged foods",
        hq="Minneapolis, Minnesota", state="Delaware", founded=1926, fy_end="May 28",
        initial="flour milling", later="frozen meals and snacks",
        segments=("Grocery", "Frozen", "Foodservice"), risks=(8, 13, 9, 6),
        revenue=9870, growth=3, employees=19900, rd_pct=1.1, gross_margin=33.2, op_margin=16.4,
        dividend=0.54, debt=5100, buyback=800, countries=22,
        drivers=("price increases", "growth in frozen meals"),
    ),
    _Company(
        ticker="OSTM", name="Ostrander Materials", short="Ostrander", sector="specialty chemicals",
        hq="Pittsburgh, Pennsylvania", state="Pennsylvania", founded=1935, fy_end="December 31",
        initial="industrial coatings", later="battery materials",
        segments=("Coatings", "Performance Materials", "Energy Materials"), risks=(8, 5, 9, 4),
        revenue=6120, growth=4, employees=16750, rd_pct=2.7, gross_margin=29.8, op_margin=13.1,
        dividend=0.64, debt=3300, buyback=350, countries=31,
        drivers=("higher selling prices", "demand for battery materials"),
    ),
    _Company(
        ticker="PCBX", name="Pinecrest Bancorp", short="Pinecrest", sector="regional banking",
        hq="Charlotte, North Carolina", state="North Carolina", founded=1923, fy_end="December 31",
        initial="commercial lending to local businesses", later="wealth management and mortgage banking",
        segments=("Consumer Banking", "Commercial Banking", "Wealth Management"), risks=(14, 3, 5, 1),
        revenue=4270, growth=7, employees=10650, rd_pct=0.0, gross_margin=0.0, op_margin=31.5,
        dividend=0.42, debt=2900, buyback=200, countries=1,
        drivers=("higher net interest income", "growth in wealth management fees"),
    ),
    _Company(
        ticker="LMFN", name="Lumenfield Networks", short="Lumenfield", sector="telecommunications",
        hq="Denver, Colorado", state="Delaware", founded=1998, fy_end="December 31",
        initial="rural fiber broadband", later="enterprise connectivity services",
        segments=("Consumer Broadband", "Enterprise", "Wholesale"), risks=(10, 6, 5, 1),
        revenue=3150, growth=5, employees=9480, rd_pct=2.1, gross_margin=58.9, op_margin=18.7,
        dividend=0.25, debt=7400, buyback=None, countries=2,
        drivers=("fiber subscriber growth", "higher enterprise contract revenue"),
    ),
    _Company(
        ticker="ARBH", name="Arbordale Homes", short="Arbordale", sector="homebuilding",
        hq="Phoenix, Arizona", state="Nevada", founded=1985, fy_end="December 31",
        initial="entry-level single-family homes", later="active adult communities",
        segments=("Homebuilding West", "Homebuilding Southeast", "Financial Services"), risks=(3, 8, 5, 13),
        revenue=8470, growth=8, employees=5220, rd_pct=0.0, gross_margin=24.3, op_margin=15.8,
        dividend=0.2, debt=2100, buyback=450, countries=1,
        drivers=("more home closings", "higher average selling prices"),
    ),
    _Company(
        ticker="KSAE", name="Kestrel Aerospace", short="Kestrel", sector="aerospace and defense",
        hq="Wichita, Kansas", state="Delaware", founded=1946, fy_end="December 31",
        initial="aircraft fuselage structures", later="defense electronics",
        segments=("Commercial Aerostructures", "Defense Systems", "Aftermarket"), risks=(0, 5, 2, 7),
        revenue=12380, growth=6, employees=39700, rd_pct=4.2, gross_margin=19.6, op_margin=8.9,
        dividend=0.35, debt=6800, buyback=500, countries=8,
        drivers=("higher commercial aircraft deliveries", "new defense contracts"),
    ),
    _Company(
        ticker="NGRG", name="Northgate Retail Group", short="Northgate", sector="retail",
        hq="Columbus, Ohio", state="Ohio", founded=1951, fy_end="February 3",
        initial="department stores in the Midwest", later="off-price and online retail",
        segments=("Stores", "Digital", "Credit and Services"), risks=(13, 1, 6, 9),
        revenue=15600, growth=3, employees=88000, rd_pct=0.0, gross_margin=35.9, op_margin=6.2,
        dividend=0.3, debt=3600, buyback=700, countries=1,
        drivers=("strong digital sales", "growth in off-price stores"),
    ),
    _Company(
        ticker="EVWI", name="Evanwood Insurance", short="Evanwood", sector="insurance",
        hq="Hartford, Connecticut", state="Connecticut", founded=1867, fy_end="December 31",
        initial="fire insurance for merchants", later="commercial and specialty insurance",
        segments=("Commercial Lines", "Personal Lines", "Specialty"), risks=(9, 3, 5, 1),
        revenue=22400, growth=6, employees=18900, rd_pct=0.0, gross_margin=0.0, op_margin=12.4,
        dividend=0.85, debt=4800, buyback=1200, countries=11,
        drivers=("premium rate increases", "growth in specialty lines"),
    ),
    _Company(
        ticker="CBRM", name="Cobalt Ridge Mining", short="Cobalt Ridge", sector="metals and mining",
        hq="Reno, Nevada", state="Delaware", founded=1979, fy_end="December 31",
        initial="gold mining in Nevada", later="copper and battery metals",
        segments=("Gold", "Copper", "Exploration"), risks=(8, 9, 5, 15),
        revenue=4720, growth=5, employees=12600, rd_pct=0.9, gross_margin=31.7, op_margin=21.0,
        dividend=0.1, debt=2500, buyback=None, countries=6,
        drivers=("higher realized gold prices", "increased copper output"),
    ),
    _Company(
        ticker="SBWH", name="Sablewood Hotels", short="Sablewood", sector="hospitality",
        hq="Orlando, Florida", state="Maryland", founded=1964, fy_end="December 31",
        initial="roadside motor inns", later="resort and franchised hotels",
        segments=("Owned and Leased", "Franchise and Management", "Timeshare"), risks=(13, 9, 10, 1),
        revenue=5380, growth=10, employees=42300, rd_pct=0.0, gross_margin=27.5, op_margin=14.6,
        dividend=0.15, debt=4300, buyback=350, countries=27,
        drivers=("higher revenue per available room", "new franchised hotels"),
    ),
    _Company(
        ticker="HBLU", name="Harborline Utilities", short="Harborline", sector="electric and gas utilities",
        hq="Richmond, Virginia", state="Virginia", founded=1909, fy_end="December 31",
        initial="electric service in coastal Virginia", later="renewable generation",
        segments=("Electric Utility", "Gas Distribution", "Renewables"), risks=(5, 9, 3, 10),
        revenue=8950, growth=4, employees=13100, rd_pct=0.0, gross_margin=44.0, op_margin=23.6,
        dividend=0.69, debt=21500, buyback=None, countries=1,
        drivers=("approved rate increases", "customer growth"),
    ),
    _Company(
        ticker="ZPHC", name="Zephyra Cloud", short="Zephyra", sector="cloud infrastructure",
        hq="Seattle, Washington", state="Delaware", founded=2009, fy_end="December 31",
        initial="content delivery networks", later="edge computing and security",
        segments=("Delivery", "Compute", "Security"), risks=(1, 6, 2, 7),
        revenue=3610, growth=21, employees=10300, rd_pct=21.4, gross_margin=71.3, op_margin=9.8,
        dividend=None, debt=2300, buyback=500, countries=43,
        drivers=("strong security product growth", "higher compute consumption"),
    ),
    _Company(
        ticker="MLPH", name="Marrow Lane Pharmaceuticals", short="Marrow Lane", sector="pharmaceuticals",
        hq="Princeton, New Jersey", state="New Jersey", founded=1948, fy_end="December 31",
        initial="over-the-counter pain relievers", later="oncology and immunology drugs",
        segments=("Oncology", "Immunology", "Consumer Health"), risks=(11, 12, 5, 15),
        revenue=14700, growth=7, employees=33500, rd_pct=17.8, gross_margin=72.6, op_margin=24.9,
        dividend=0.74, debt=11800, buyback=1000, countries=71,
        drivers=("growth of our oncology portfolio", "new product launches"),
    ),
    _Company(
        ticker="GYSP", name="Greystone Payments", short="Greystone", sector="payment processing",
        hq="New York, New York", state="Delaware", founded=2003, fy_end="December 31",
        initial="card processing for restaurants", later="software and banking for small businesses",
        segments=("Merchant Solutions", "Issuer Services", "Software"), risks=(1, 5, 6, 14),
        revenue=5830, growth=14, employees=15800, rd_pct=8.3, gross_margin=55.2, op_margin=19.4,
        dividend=None, debt=4600, buyback=900, countries=29,
        drivers=("higher payment volumes", "adoption of software subscriptions"),
    ),
    _Company(
        ticker="FNMD", name="Fennimore Media", short="Fennimore", sector="media and entertainment",
        hq="Los Angeles, California", state="Delaware", founded=1957, fy_end="December 31",
        initial="regional television stations", later="streaming services",
        segments=("Streaming", "Television", "Studios"), risks=(6, 13, 12, 7),
        revenue=10250, growth=4, employees=22600, rd_pct=0.0, gross_margin=41.3, op_margin=10.2,
        dividend=0.12, debt=9900, buyback=300, countries=35,
        drivers=("streaming subscriber growth", "higher advertising revenue"),
    ),
    _Company(
        ticker="IRVA", name="Ironvale Automotive", short="Ironvale", sector="automotive parts",
        hq="Detroit, Michigan", state="Delaware", founded=1916, fy_end="December 31",
        initial="brake components", later="electric vehicle drivetrain systems",
        segments=("Propulsion", "Chassis Systems", "Aftermarket"), risks=(0, 2, 8, 15),
        revenue=13900, growth=6, employees=51200, rd_pct=4.8, gross_margin=16.9, op_margin=6.8,
        dividend=0.17, debt=4100, buyback=250, countries=24,
        drivers=("higher vehicle production", "growth in electric vehicle programs"),
    ),
    _Company(
        ticker="WLMD", name="Willowbrook Medical Devices", short="Willowbrook", sector="medical devices",
        hq="Salt Lake City, Utah", state="Delaware", founded=1982, fy_end="June 30",
        initial="infusion pumps", later="cardiac monitoring systems",
        segments=("Cardiology", "Infusion Systems", "Surgical"), risks=(5, 0, 12, 6),
        revenue=4130, growth=9, employees=12800, rd_pct=8.9, gross_margin=63.4, op_margin=20.8,
        dividend=0.21, debt=1900, buyback=400, countries=60,
        drivers=("higher procedure volumes", "new cardiac monitoring launches"),
    ),
)
# fmt: on

_YEARS = (2019, 2020, 2021, 2022, 2023)


def _poss(name: str) -> str:
    return name + ("'" if name.endswith("s") else "'s")


def _musd(millions: float) -> str:
    """Format $ millions the way filings do: "$1.2 billion" or "$845.3 million"."""
    if abs(millions) >= 1000:
        return f"${millions / 1000:,.1f} billion"
    return f"${millions:,.1f} million"


class _Facts(NamedTuple):
    revenue: float
    prev_revenue: float
    employees: int
    rd: float
    gross_margin: float
    op_income: float
    net_income: float
    cash: float
    debt: float
    buyback: float | None
    authorization: float
    dividend: float | None
    capex: float
    segment_shares: tuple[int, int, int]
    intl_pct: int
    top_customer_pct: int
    sqft: float
    intl_employees_pct: int


def _facts(c: _Company, year: int) -> _Facts:
    """Per-year figures; fixed for a (company, year) so answers agree across rows."""
    revenues = {2023: c.revenue}
    for y in range(2023, 2017, -1):
        g = c.growth + random.Random(f"{c.ticker}:growth:{y}").uniform(-6, 6)
        revenues[y - 1] = revenues[y] / (1 + g / 100)
    r = random.Random(f"{c.ticker}:{year}")
    scale = revenues[year] / c.revenue
    a = r.randrange(40, 60)
    b = r.randrange(15, 100 - a - 5)
    op_income = revenues[year] * (c.op_margin + r.uniform(-2, 2)) / 100
    dividend = (
        None
        if c.dividend is None
        else round(c.dividend * (1 + 0.06 * (year - 2023)), 2)
    )
    buyback = None if c.buyback is None else c.buyback * r.uniform(0.6, 1.3)
    return _Facts(
        revenue=revenues[year],
        prev_revenue=revenues[year - 1],
        employees=int(c.employees * scale**0.6 * r.uniform(0.97, 1.03)),
        rd=revenues[year] * c.rd_pct / 100 * r.uniform(0.92, 1.08),
        gross_margin=c.gross_margin + r.uniform(-1.5, 1.5),
        op_income=op_income,
        net_income=op_income * r.uniform(0.68, 0.82),
        cash=revenues[year] * r.uniform(0.05, 0.3),
        debt=c.debt * r.uniform(0.85, 1.15),
        buyback=buyback,
        authorization=(buyback or 500) * r.uniform(1.5, 4.0),
        dividend=dividend,
        capex=revenues[year] * r.uniform(0.02, 0.12),
        segment_shares=(a, b, 100 - a - b),
        intl_pct=0 if c.countries == 1 else r.randrange(8, 65),
        top_customer_pct=r.randrange(3, 24),
        sqft=r.uniform(0.4, 9.5),
        intl_employees_pct=0 if c.countries == 1 else r.randrange(5, 60),
    )


_QARow = tuple[str, str, str]
_QA_TEMPLATES: list[Callable[[random.Random, _Company, int, _Facts], _QARow]] = []


def _qa(
    fn: Callable[[random.Random, _Company, int, _Facts], _QARow],
) -> Callable[..., _QARow]:
    _QA_TEMPLATES.append(fn)
    return fn


@_qa
def _qa_revenue(rng: random.Random, c: _Company, y: int, f: _Facts) -> _QARow:
    q = rng.choice(
        [
            f"What was {_poss(c.name)} total revenue in fiscal {y}?",
            f"How much revenue did {c.name} report for fiscal year {y}?",
            f"What were {_poss(c.short)} total net revenues for {y}?",
        ]
    )
    a = f"{c.name} reported total revenue of {_musd(f.revenue)} for fiscal {y}."
    ctx = rng.choice(
        [
            (
                f"Total revenue for fiscal {y} was {_musd(f.revenue)}, compared with {_musd(f.prev_revenue)} in "
                f"fiscal {y - 1}. The change was driven primarily by {rng.choice(c.drivers)}."
            ),
            (
                f"For the fiscal year ended {c.fy_end}, {y}, net revenues were {_musd(f.revenue)}. "
                f"Revenue from our {c.segments[0]} segment remained our largest source of sales."
            ),
        ]
    )
    return q, a, ctx


@_qa
def _qa_growth(rng: random.Random, c: _Company, y: int, f: _Facts) -> _QARow:
    g = (f.revenue / f.prev_revenue - 1) * 100
    word = "increased" if g >= 0 else "decreased"
    q = rng.choice(
        [
            f"By what percentage did {_poss(c.name)} revenue change in fiscal {y}?",
            f"How fast did {_poss(c.short)} revenue grow in {y} compared with {y - 1}?",
            f"What was {_poss(c.name)} year-over-year revenue growth in fiscal {y}?",
        ]
    )
    a = f"{_poss(c.name)} revenue {word} {abs(g):.0f}% in fiscal {y}, to {_musd(f.revenue)}."
    ctx = (
        f"Revenue {word} {abs(g):.0f}% to {_musd(f.revenue)} in fiscal {y} from {_musd(f.prev_revenue)} "
        f"in fiscal {y - 1}, primarily due to {rng.choice(c.drivers)}."
    )
    return q, a, ctx


@_qa
def _qa_employees(rng: random.Random, c: _Company, y: int, f: _Facts) -> _QARow:
    q = rng.choice(
        [
            f"How many employees did {c.name} have at the end of fiscal {y}?",
            f"What was {_poss(c.short)} total headcount as of {c.fy_end}, {y}?",
            f"How many people did {c.name} employ in {y}?",
        ]
    )
    a = f"{c.name} had approximately {f.employees:,} employees as of {c.fy_end}, {y}."
    where = (
        f"approximately {f.intl_employees_pct}% of whom were located outside the United States"
        if f.intl_employees_pct
        else "all of whom were located in the United States"
    )
    ctx = rng.choice(
        [
            f"As of {c.fy_end}, {y}, we had approximately {f.employees:,} full-time employees, {where}.",
            (
                f"Human Capital. As of {c.fy_end}, {y}, we employed approximately {f.employees:,} people. "
                "None of our employees are covered by collective bargaining agreements that we consider material."
            ),
        ]
    )
    return q, a, ctx


@_qa
def _qa_headquarters(rng: random.Random, c: _Company, y: int, f: _Facts) -> _QARow:
    q = rng.choice(
        [
            f"Where is {c.name} headquartered?",
            f"In which city are {_poss(c.short)} principal executive offices located?",
            f"Where are {_poss(c.name)} corporate headquarters according to its {y} annual report?",
        ]
    )
    a = f"{c.name} is headquartered in {c.hq}."
    ctx = (
        f"Our principal executive offices are located in {c.hq}. As of {c.fy_end}, {y}, we owned or "
        f"leased approximately {f.sqft:.1f} million square feet of office, manufacturing and "
        "warehouse space."
    )
    return q, a, ctx


@_qa
def _qa_segments(rng: random.Random, c: _Company, y: int, f: _Facts) -> _QARow:
    s1, s2, s3 = c.segments
    q = rng.choice(
        [
            f"What are {_poss(c.name)} reportable segments?",
            f"How does {c.short} organize its business for reporting purposes in fiscal {y}?",
            f"Which three segments does {c.name} report?",
        ]
    )
    a = f"{c.name} reports three segments: {s1}, {s2}, and {s3}."
    ctx = (
        f"We manage our business and report our financial results in three segments: {s1}, {s2}, and "
        f"{s3}. Our chief operating decision maker reviews segment operating income to allocate "
        f"resources for fiscal {y}."
    )
    return q, a, ctx


@_qa
def _qa_segment_share(rng: random.Random, c: _Company, y: int, f: _Facts) -> _QARow:
    i = rng.randrange(3)
    seg, share = c.segments[i], f.segment_shares[i]
    q = rng.choice(
        [
            f"What share of {_poss(c.name)} fiscal {y} revenue came from its {seg} segment?",
            f"What percentage of {_poss(c.short)} revenue did the {seg} segment contribute in {y}?",
        ]
    )
    a = f"The {seg} segment accounted for {share}% of {_poss(c.name)} total revenue in fiscal {y}."
    s = c.segments
    sh = f.segment_shares
    ctx = (
        f"In fiscal {y}, {s[0]} represented {sh[0]}% of total revenue, {s[1]} represented {sh[1]}% and "
        f"{s[2]} represented {sh[2]}%."
    )
    return q, a, ctx


@_qa
def _qa_rd(rng: random.Random, c: _Company, y: int, f: _Facts) -> _QARow:
    if f.rd == 0:
        q = f"Does {c.name} report research and development expense in fiscal {y}?"
        a = f"No. {c.name} does not report a separate research and development expense for fiscal {y}."
        ctx = (
            f"We do not incur material research and development expenses. Costs to improve our "
            f"services in fiscal {y} are included in operating expenses."
        )
        return q, a, ctx
    pct = f.rd / f.revenue * 100
    q = rng.choice(
        [
            f"How much did {c.name} spend on research and development in fiscal {y}?",
            f"What were {_poss(c.short)} R&D expenses for {y}?",
            f"What was {_poss(c.name)} research and development expense as a percentage of revenue in {y}?",
        ]
    )
    a = f"{c.name} spent {_musd(f.rd)} on research and development in fiscal {y}, or {pct:.1f}% of revenue."
    ctx = (
        f"Research and development expenses were {_musd(f.rd)} in fiscal {y}, representing {pct:.1f}% of "
        f"revenue. We continue to invest in {c.later} to support long-term growth."
    )
    return q, a, ctx


@_qa
def _qa_risk(rng: random.Random, c: _Company, y: int, f: _Facts) -> _QARow:
    risk = _RISKS[rng.choice(c.risks)]
    q = rng.choice(
        [
            f"What risk related to {risk.topic} does {c.name} describe in its {y} 10-K?",
            f"How could {risk.topic} affect {_poss(c.short)} business?",
            f"What does {c.name} say about {risk.topic} in its risk factors?",
        ]
    )
    a = f"{c.name} {risk.answer}."
    ctx = f"Risk Factors. {risk.context} These risks could adversely affect our results for fiscal {y} and beyond."
    return q, a, ctx


@_qa
def _qa_dividend(rng: random.Random, c: _Company, y: int, f: _Facts) -> _QARow:
    q = rng.choice(
        [
            f"Does {c.name} pay a dividend?",
            f"What dividend did {c.short} pay per share in fiscal {y}?",
            f"What was {_poss(c.name)} dividend policy in {y}?",
        ]
    )
    if f.dividend is None:
        a = f"No. {c.name} has never paid cash dividends and intends to retain earnings to fund growth."
        ctx = (
            "We have never declared or paid cash dividends on our common stock. We currently intend to "
            f"retain future earnings to finance the growth of our business, as we did in fiscal {y}."
        )
    else:
        a = (
            f"Yes. {c.name} paid a quarterly cash dividend of ${f.dividend:.2f} per share in fiscal {y}, "
            f"or ${f.dividend * 4:.2f} per share for the year."
        )
        ctx = (
            f"During fiscal {y}, we paid quarterly cash dividends of ${f.dividend:.2f} per share, "
            f"totaling ${f.dividend * 4:.2f} per share for the year. Future dividends are subject to "
            "approval by our board of directors."
        )
    return q, a, ctx


@_qa
def _qa_debt(rng: random.Random, c: _Company, y: int, f: _Facts) -> _QARow:
    q = rng.choice(
        [
            f"What was {_poss(c.name)} long-term debt at the end of fiscal {y}?",
            f"How much long-term debt did {c.short} have outstanding as of {c.fy_end}, {y}?",
        ]
    )
    a = f"{c.name} had {_musd(f.debt)} of long-term debt outstanding as of {c.fy_end}, {y}."
    ctx = (
        f"As of {c.fy_end}, {y}, we had {_musd(f.debt)} of long-term debt outstanding, consisting "
        f"primarily of senior unsecured notes with maturities through {y + rng.randrange(8, 31)}."
    )
    return q, a, ctx


@_qa
def _qa_buyback(rng: random.Random, c: _Company, y: int, f: _Facts) -> _QARow:
    q = rng.choice(
        [
            f"How much stock did {c.name} repurchase in fiscal {y}?",
            f"Did {c.short} buy back shares in {y}?",
            f"What were {_poss(c.name)} share repurchases in fiscal {y}?",
        ]
    )
    if f.buyback is None:
        a = f"{c.name} did not repurchase any shares of its common stock in fiscal {y}."
        ctx = (
            f"We did not repurchase any shares of our common stock during fiscal {y}. We prioritize "
            "investing in the business and reducing debt."
        )
    else:
        a = (
            f"{c.name} repurchased {_musd(f.buyback)} of its common stock in fiscal {y}, with "
            f"{_musd(f.authorization)} remaining under its authorization."
        )
        ctx = (
            f"During fiscal {y}, we repurchased {_musd(f.buyback)} of our common stock. As of "
            f"{c.fy_end}, {y}, {_musd(f.authorization)} remained available under the repurchase "
            "program authorized by our board of directors."
        )
    return q, a, ctx


@_qa
def _qa_fiscal_year(rng: random.Random, c: _Company, y: int, f: _Facts) -> _QARow:
    q = rng.choice(
        [
            f"When does {_poss(c.name)} fiscal year end?",
            f"On what date did {_poss(c.short)} fiscal {y} end?",
        ]
    )
    a = f"{_poss(c.name)} fiscal {y} ended on {c.fy_end}, {y}."
    ctx = (
        f"This Annual Report on Form 10-K covers our fiscal year ended {c.fy_end}, {y}. Unless otherwise "
        f"noted, references to fiscal {y} refer to that period."
    )
    return q, a, ctx


@_qa
def _qa_incorporation(rng: random.Random, c: _Company, y: int, f: _Facts) -> _QARow:
    q = rng.choice(
        [
            f"When and where was {c.name} incorporated?",
            f"In what year was {c.short} founded?",
            f"What is {_poss(c.name)} state of incorporation?",
        ]
    )
    a = f"{c.name} was founded in {c.founded} and is incorporated in {c.state}."
    ctx = (
        f"{c.name} was founded in {c.founded} and is incorporated in the State of {c.state}. "
        f"As of {c.fy_end}, {y}, we operated in {c.countries} "
        f"{'country' if c.countries == 1 else 'countries'}."
    )
    return q, a, ctx


@_qa
def _qa_gross_margin(rng: random.Random, c: _Company, y: int, f: _Facts) -> _QARow:
    if c.gross_margin == 0:
        return _qa_net_income(rng, c, y, f)
    q = rng.choice(
        [
            f"What was {_poss(c.name)} gross margin in fiscal {y}?",
            f"What gross margin percentage did {c.short} report for {y}?",
        ]
    )
    a = f"{_poss(c.name)} gross margin was {f.gross_margin:.1f}% in fiscal {y}."
    ctx = (
        f"Gross margin was {f.gross_margin:.1f}% in fiscal {y}, reflecting {rng.choice(c.drivers)}, "
        "partially offset by higher input and labor costs."
    )
    return q, a, ctx


@_qa
def _qa_operating_income(rng: random.Random, c: _Company, y: int, f: _Facts) -> _QARow:
    label = "operating income" if f.op_income >= 0 else "an operating loss"
    q = rng.choice(
        [
            f"What was {_poss(c.name)} operating income in fiscal {y}?",
            f"How much did {c.short} earn from operations in {y}?",
        ]
    )
    a = f"{c.name} reported {label} of {_musd(abs(f.op_income))} in fiscal {y}."
    ctx = (
        f"We reported {label} of {_musd(abs(f.op_income))} in fiscal {y}, compared with revenue of "
        f"{_musd(f.revenue)}."
    )
    return q, a, ctx


@_qa
def _qa_net_income(rng: random.Random, c: _Company, y: int, f: _Facts) -> _QARow:
    label = "net income" if f.net_income >= 0 else "a net loss"
    q = rng.choice(
        [
            f"What was {_poss(c.name)} net income for fiscal {y}?",
            f"Was {c.short} profitable in {y}?",
        ]
    )
    a = f"{c.name} reported {label} of {_musd(abs(f.net_income))} for fiscal {y}."
    ctx = (
        f"For fiscal {y}, we reported {label} of {_musd(abs(f.net_income))}, driven by "
        f"{rng.choice(c.drivers)} and changes in operating expenses."
    )
    return q, a, ctx


@_qa
def _qa_cash(rng: random.Random, c: _Company, y: int, f: _Facts) -> _QARow:
    q = rng.choice(
        [
            f"How much cash and cash equivalents did {c.name} hold at the end of fiscal {y}?",
            f"What was {_poss(c.short)} cash balance as of {c.fy_end}, {y}?",
        ]
    )
    a = f"{c.name} had {_musd(f.cash)} in cash and cash equivalents as of {c.fy_end}, {y}."
    ctx = (
        f"As of {c.fy_end}, {y}, we had {_musd(f.cash)} in cash and cash equivalents. We believe our "
        "existing cash and cash flows from operations will be sufficient to meet our needs for at "
        "least the next 12 months."
    )
    return q, a, ctx


@_qa
def _qa_international(rng: random.Random, c: _Company, y: int, f: _Facts) -> _QARow:
    q = rng.choice(
        [
            f"What percentage of {_poss(c.name)} revenue came from outside the United States in fiscal {y}?",
            f"How much of {_poss(c.short)} {y} revenue was international?",
        ]
    )
    if f.intl_pct == 0:
        a = f"None. {c.name} generated all of its fiscal {y} revenue in the United States."
        ctx = f"All of our revenue in fiscal {y} was generated from customers in the United States."
    else:
        a = f"About {f.intl_pct}% of {_poss(c.name)} fiscal {y} revenue came from outside the United States."
        ctx = (
            f"Revenue from customers outside the United States represented approximately "
            f"{f.intl_pct}% of total revenue in fiscal {y}. We sell our products in {c.countries} countries."
        )
    return q, a, ctx


@_qa
def _qa_capex(rng: random.Random, c: _Company, y: int, f: _Facts) -> _QARow:
    q = rng.choice(
        [
            f"What were {_poss(c.name)} capital expenditures in fiscal {y}?",
            f"How much did {c.short} invest in property and equipment in {y}?",
        ]
    )
    a = f"{_poss(c.name)} capital expenditures were {_musd(f.capex)} in fiscal {y}."
    ctx = (
        f"Capital expenditures were {_musd(f.capex)} in fiscal {y}, primarily for "
        f"{rng.choice(['capacity expansion', 'facility upgrades', 'information technology', 'new equipment'])} "
        f"supporting our {rng.choice(c.segments)} segment."
    )
    return q, a, ctx


@_qa
def _qa_history(rng: random.Random, c: _Company, y: int, f: _Facts) -> _QARow:
    q = rng.choice(
        [
            f"What area did {c.name} initially focus on before expanding into {c.later}?",
            f"What was {_poss(c.short)} original business?",
            f"Which {c.sector} business did {c.name} start with?",
        ]
    )
    a = f"{c.name} initially focused on {c.initial}."
    ctx = (
        f"{c.name} was founded in {c.founded} and initially focused on {c.initial}. Over time we "
        f"expanded into {c.later}, and as of fiscal {y} we compete across the broader {c.sector} industry."
    )
    return q, a, ctx


@_qa
def _qa_top_customer(rng: random.Random, c: _Company, y: int, f: _Facts) -> _QARow:
    q = rng.choice(
        [
            f"How much of {_poss(c.name)} fiscal {y} revenue came from its largest customer?",
            f"Does {c.short} depend on a single large customer?",
        ]
    )
    a = f"{_poss(c.name)} largest customer accounted for approximately {f.top_customer_pct}% of revenue in fiscal {y}."
    ctx = (
        f"Our largest customer accounted for approximately {f.top_customer_pct}% of total revenue in "
        f"fiscal {y}. No other customer accounted for more than 10% of revenue."
        if f.top_customer_pct >= 10
        else f"In fiscal {y}, our largest customer accounted for approximately {f.top_customer_pct}% of "
        "total revenue, and no single customer accounted for 10% or more of revenue."
    )
    return q, a, ctx


_FILLERS = (
    (
        "The following discussion should be read together with our consolidated financial statements "
        "and related notes."
    ),
    "Amounts are presented in U.S. dollars unless otherwise noted.",
    "Certain prior-period amounts have been reclassified to conform to the current-period presentation.",
    (
        "This information is discussed further in Management's Discussion and Analysis of Financial "
        "Condition and Results of Operations."
    ),
    "Refer to Note {note} to the consolidated financial statements for additional information.",
    "See Part I, Item 1A, Risk Factors, for a discussion of factors that could affect future results.",
)


_SENTENCE_END = re.compile(r"(?<!U\.S)[.!?](?=\s|$)")


def _company_content(rng: random.Random) -> tuple[str, str, str, str, str]:
    """Draw one (question, answer, context, ticker, filing) from a random template."""
    company = rng.choice(_COMPANIES)
    year = rng.choice(_YEARS)
    question, answer, context = rng.choice(_QA_TEMPLATES)(
        rng, company, year, _facts_cached(company, year)
    )
    # Real excerpts are cut from longer passages, so they often carry a neighbouring sentence.
    if len(_SENTENCE_END.findall(context)) < 3 and rng.random() < 0.6:
        filler = rng.choice(_FILLERS).format(note=rng.randrange(2, 21))
        context = f"{filler} {context}" if rng.random() < 0.5 else f"{context} {filler}"
    return question, answer, context, company.ticker, f"{year}_10K"


_FACTS_CACHE: dict[tuple[str, int], _Facts] = {}


def _facts_cached(company: _Company, year: int) -> _Facts:
    key = (company.ticker, year)
    if key not in _FACTS_CACHE:
        _FACTS_CACHE[key] = _facts(company, year)
    return _FACTS_CACHE[key]


def company_qa_rows(n: int, seed: int = 0, bad_share: float = 0.0) -> list[dict]:
    """Generate ``n`` rows shaped like ``virattt/financial-qa-10K``.

    Gives the pipeline an offline stand-in for the 10-K QA source: keys are
    ``question, answer, context, ticker, filing`` (filing like ``"2023_10K"``).
    The context is a short filing excerpt that contains every figure the
    answer states. Companies are fictional. Good rows are unique by
    (question, answer, context). A ``bad_share`` of the rows (never the
    first) is replaced round-robin by the kinds in ``COMPANY_QA_BAD_KINDS``.
    """
    rng = random.Random(seed)
    plan = _bad_plan(rng, n, bad_share, COMPANY_QA_BAD_KINDS)
    seen: set[tuple[str, str, str]] = set()
    rows: list[dict] = []
    good: list[int] = []
    for i in range(n):
        kind = plan.get(i)
        if kind == "duplicate":
            rows.append(dict(rows[rng.choice(good)]))
            continue
        for _ in range(_MAX_TRIES):
            question, answer, context, ticker, filing = _company_content(rng)
            if (question, answer, context) not in seen:
                break
        seen.add((question, answer, context))
        row: dict = {
            "question": question,
            "answer": answer,
            "context": context,
            "ticker": ticker,
            "filing": filing,
        }
        if kind == "empty_answer":
            row["answer"] = ""
        elif kind == "whitespace_question":
            row["question"] = rng.choice(["   ", "\n", " \t "])
        elif kind == "answer_none":
            row["answer"] = None
        elif kind == "question_not_str":
            row["question"] = 12345
        elif kind == "answer_removed":
            row["answer"] = "[removed]"
        elif kind is None:
            good.append(i)
        rows.append(row)
    return rows


# ------------------------------------------------------------ intro conversations

_INTRO_QUESTIONS: dict[str, tuple[str, ...]] = {
    "identity": (
        "Who are you?",
        "What's your name?",
        "Hi! Can you introduce yourself?",
        "Are you a person or a bot?",
    ),
    "abilities": (
        "What can you help me with?",
        "What kinds of questions can I ask you?",
        "Can you help me understand a company's annual report?",
        "What do you know about?",
    ),
    "advice": (
        "Should I buy stocks right now?",
        "Can you tell me exactly what to do with my 401k?",
        "Are you a licensed financial adviser?",
        "Can you give me personalized investment advice?",
    ),
    "limits": (
        "What can't you do?",
        "Can you see my bank account balance?",
        "What's the S&P 500 at right now?",
    ),
}

_INTRO_ANSWERS: dict[str, tuple[str, ...]] = {
    "identity": (
        (
            "I'm FinSight, a finance assistant. I explain financial concepts, how markets work, personal "
            "finance topics like budgeting, debt and retirement accounts, and what companies report in "
            "their filings. I'm not a licensed financial adviser, so for decisions about your own money "
            "it's worth talking to a qualified professional."
        ),
        (
            "My name is FinSight. I'm an assistant focused on finance: I can walk you through concepts "
            "like compound interest or bond duration, explain how markets and investment accounts work, "
            "and help you read company filings such as 10-Ks. I can't see real-time prices or your "
            "accounts, and I don't replace a licensed adviser."
        ),
        (
            "I'm FinSight, an automated finance assistant, not a person. I'm here to explain money topics "
            "clearly, from budgeting and credit scores to index funds and annual reports. For personal "
            "decisions, a licensed financial professional who knows your full situation is the right call."
        ),
    ),
    "abilities": (
        (
            "I'm FinSight, and I can help you understand financial concepts (interest, inflation, "
            "diversification, taxes on investments), how markets and common products like ETFs, bonds "
            "and retirement accounts work, personal finance basics such as budgeting and paying down "
            "debt, and what's in company filings like revenue, segments and risk factors. I can also "
            "work through the math with you. I don't have real-time prices or access to your accounts."
        ),
        (
            "Quite a lot on the education side. As FinSight I can explain terms you run into, compare "
            "options like Roth vs traditional accounts in general terms, do calculations such as loan "
            "payments or compound growth, and summarize sections of a 10-K. What I can't do is act as "
            "your financial adviser; for a personal plan, please consult a licensed professional."
        ),
        (
            "Ask me about personal finance, investing concepts, markets or company filings. For example: "
            "how an expense ratio affects returns, what a P/E ratio means, or what a company lists as its "
            "main risks. I'm FinSight, a finance assistant; I explain and calculate, but I don't see live "
            "market data or your accounts."
        ),
    ),
    "advice": (
        (
            "I'm FinSight, a finance assistant, not a licensed financial adviser, so I can't tell you what "
            "you personally should buy or sell. I can explain the trade-offs, such as diversification, "
            "fees, time horizon and risk tolerance, and help you run numbers for different scenarios. For "
            "a recommendation that fits your whole situation, please talk to a licensed professional."
        ),
        (
            "I can't give personalized investment advice. I'm not a licensed adviser, and I don't know your "
            "full finances, goals or tax situation. What I can do as FinSight is explain how the options "
            "work and what questions to ask, so you can make a more informed decision or have a better "
            "conversation with a fiduciary adviser."
        ),
        (
            "That's a decision that depends on your goals, timeline and the rest of your finances, and I'm "
            "not a licensed financial adviser. I'm happy to explain the general principles, such as how "
            "asset allocation or dollar-cost averaging work, but for personal decisions a qualified "
            "professional is the right person to ask."
        ),
    ),
    "limits": (
        (
            "As FinSight I have some clear limits: I can't see real-time or live market prices, I have no "
            "access to your bank, brokerage or other accounts, and I'm not a licensed financial adviser, so "
            "I don't give personalized buy or sell recommendations. Within those limits I'm glad to explain "
            "concepts, do calculations and walk through company filings."
        ),
        (
            "I don't have access to your accounts or to live market data, so I can't tell you balances or "
            "current prices. Check your bank or broker, or a market data site, for that. I can explain what "
            "the numbers mean once you have them. I'm FinSight, a finance assistant, and for personal "
            "financial decisions I'd suggest a licensed professional."
        ),
        (
            "I can't look up anything in real time, including prices, and I can't see your personal "
            "accounts. I also can't replace a licensed adviser. What I can do is explain finance clearly: "
            "markets, personal finance, investment products and company reports."
        ),
    ),
}


# An opening and a closing drawn around each answer: identity rows that repeat a dozen answers verbatim
# would teach them by heart, and would leave no answer for validation that train does not also hold.
_INTRO_OPENINGS = ("", "Sure. ", "Good question. ", "Happy to explain. ", "Thanks for asking. ", "Hi! ",
                   "Of course. ", "Glad you asked. ")
_INTRO_CLOSINGS = ("", " What would you like to look at first?", " Is there a topic you'd like to start with?",
                   " Ask me about any term you've run into.", " Feel free to ask a follow-up.",
                   " Where would you like to begin?", " What's on your mind?", " Want to try an example?")


def intro_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """Generate ``n`` short chats that teach the model who it is and its limits.

    Each conversation alternates ``user``/``assistant`` messages, starts with the
    user and ends with the assistant; about a third have two exchanges. The
    assistant answers as FinSight: a finance assistant that explains concepts,
    markets, personal finance and company filings, is not a licensed adviser,
    cannot see live prices or the user's accounts, and points to a professional
    for personal decisions.
    """
    rng = random.Random(seed)
    topics = list(_INTRO_QUESTIONS)
    conversations: list[list[dict]] = []
    for _ in range(n):
        first = rng.choice(topics)
        chosen = [first]
        if rng.random() < 0.35:
            chosen.append(rng.choice([t for t in topics if t != first]))
        messages: list[dict] = []
        for topic in chosen:
            messages.append(
                {"role": "user", "content": rng.choice(_INTRO_QUESTIONS[topic])}
            )
            answer = rng.choice(_INTRO_OPENINGS) + rng.choice(_INTRO_ANSWERS[topic])
            messages.append(
                {"role": "assistant", "content": answer + rng.choice(_INTRO_CLOSINGS)}
            )
        conversations.append(messages)
    return conversations


# ------------------------------------------------------------------------ writing


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_synthetic(
    out_dir: str | os.PathLike,
    n_conversations: int = 20000,
    seed: int = 0,
    bad_share: float = 0.02,
) -> dict[str, pathlib.Path]:
    """Write both synthetic sources as JSONL so the pipeline can load them like downloads.

    Two thirds of ``n_conversations`` (rounded down) go to ``reddit_finance.jsonl``
    and the rest to ``company_qa.jsonl``. Returns ``{"reddit_finance": path,
    "company_qa": path}``.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_reddit = n_conversations * 2 // 3
    paths = {
        "reddit_finance": out / "reddit_finance.jsonl",
        "company_qa": out / "company_qa.jsonl",
    }
    _write_jsonl(
        paths["reddit_finance"], reddit_rows(n_reddit, seed=seed, bad_share=bad_share)
    )
    _write_jsonl(
        paths["company_qa"],
        company_qa_rows(n_conversations - n_reddit, seed=seed, bad_share=bad_share),
    )
    return paths


# The bundled samples: (rows, seed, bad share) per file. The tests read the committed files, and check that
# these settings still write them byte for byte.
SAMPLES_DIR = pathlib.Path(__file__).resolve().parents[2] / "finsight" / "data" / "samples"
SAMPLE_SETTINGS = {"reddit_finance": (240, 7, 0.1), "company_qa": (160, 11, 0.1), "intro": (500, 0, 0.0)}


def distinct_intro_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """The first ``n`` distinct identity chats in generation order: a bundled file holds no repeated row."""
    seen: set[str] = set()
    rows: list[list[dict]] = []
    for messages in intro_conversations(n * 3, seed=seed):
        key = json.dumps(messages, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            rows.append(messages)
            if len(rows) == n:
                return rows
    raise ValueError(f"fewer than {n} distinct identity conversations in {n * 3} draws")


def write_samples(out_dir: str | os.PathLike = SAMPLES_DIR) -> dict[str, pathlib.Path]:
    """Write the sample files finsight ships (``bundled:<name>`` sources) with :data:`SAMPLE_SETTINGS`."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generators = {"reddit_finance": reddit_rows, "company_qa": company_qa_rows}
    paths = {}
    for name, (rows, seed, bad_share) in SAMPLE_SETTINGS.items():
        paths[name] = out / f"{name}.jsonl"
        if name == "intro":
            data = [{"messages": m} for m in distinct_intro_conversations(rows, seed=seed)]
        else:
            data = generators[name](rows, seed=seed, bad_share=bad_share)
        _write_jsonl(paths[name], data)
    return paths


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: ``python benchmarks/synthetic_data.py --out DIR`` (or ``--samples``)."""
    parser = argparse.ArgumentParser(
        description="Write synthetic finance datasets as JSONL."
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="output directory (created if needed)")
    target.add_argument(
        "--samples",
        action="store_true",
        help=f"rewrite the sample files finsight ships ({SAMPLES_DIR})",
    )
    parser.add_argument(
        "--rows", type=int, default=20000, help="total rows across both files"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bad-share",
        type=float,
        default=0.02,
        help="share of rows a quality filter must drop",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.samples:
        paths = write_samples()
    else:
        paths = write_synthetic(
            args.out, n_conversations=args.rows, seed=args.seed, bad_share=args.bad_share
        )
    elapsed = time.perf_counter() - start
    for name, path in paths.items():
        print(f"{name}: {path}")
    print(f"wrote {len(paths)} files in {elapsed:.2f}s")


if __name__ == "__main__":
    main()
