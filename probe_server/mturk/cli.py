"""``probe-server hits ...`` and ``probe-server fake-mturk``: thin wrappers of the API.

Every ``hits`` command talks to the MTurk sandbox unless ``--live`` is given.
A live publish shows what it will cost and asks before spending anything;
scripts say ``--yes``. Nothing here prints credentials.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from . import fees
from .experiment import Experiment, ExperimentError, load_experiment
from .target import RequesterError, Target

if TYPE_CHECKING:
    from .requester import Plan, Requester

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_NOT_CONFIRMED = 0, 1, 2, 3
DEFAULT_FAKE_LISTEN = "127.0.0.1:8765"
TERMS_FLAG = "--software-terms-checked"
# The paper's §3.2: MTurk removed a HIT that asked workers to download and
# run a measurement tool, under its terms of the time; its terms have
# changed since. Only the researcher can check what they say today.
SOFTWARE_TERMS_WARNING = (
    'WARNING: this experiment (kind = "tool") asks workers to download and run software.'
    " MTurk's terms and policies restrict HITs that require software downloads (in 2013 they"
    " forbade them, and MTurk removed such a HIT; later terms forbid only harmful software)."
    " Check the current MTurk terms of service and acceptable use policy before publishing:"
    " a HIT that breaks them may be removed and the account suspended."
)


def ask(question: str) -> bool:
    """A yes/no question on the terminal; anything but a terminal answers no."""
    stdin = sys.stdin
    if stdin is None or not stdin.isatty():
        return False
    try:
        answer = input(question)
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def _endpoint(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"expected an http(s):// URL, got {value!r}")
    return value.rstrip("/")


def _dollars(value: str) -> Decimal:
    try:
        amount = Decimal(value)
    except ArithmeticError:
        raise argparse.ArgumentTypeError(f"expected dollars, e.g. 5.00, got {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise argparse.ArgumentTypeError(f"expected dollars, e.g. 5.00, got {value!r}")
    return amount


def _short_of(available: str, cost: Decimal) -> bool:
    """The balance MTurk reported (a dollar string) is less than the cost."""
    try:
        return Decimal(available) < cost
    except ArithmeticError:
        return False  # not a number we can read: the balance was printed as is


def _target(args: argparse.Namespace) -> Target:
    return Target(live=args.live, endpoint_url=args.endpoint_url, profile=args.profile)


def _describe_target(target: Target) -> str:
    where = target.label
    if target.custom:
        where += f" at {target.url}"
    return where


Command = Callable[[argparse.Namespace], int]


def handled(command: Command) -> Command:
    """Turn the workflow's errors into one line on stderr and an exit status.

    botocore is imported only here, when a command runs: ``probe-server
    serve`` never loads the AWS SDK.
    """

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return command(args)
        except ExperimentError as e:
            print(f"probe-server: experiment file error: {e}", file=sys.stderr)
            return EXIT_USAGE
        except RequesterError as e:
            print(f"probe-server: {e}", file=sys.stderr)
            return EXIT_FAILURE
        except ClientError as e:
            error = e.response.get("Error", {})
            code, message = error.get("Code", "?"), error.get("Message", e)
            print(f"probe-server: MTurk refused: {code}: {message}", file=sys.stderr)
            return EXIT_FAILURE
        except BotoCoreError as e:
            # e.g. no credentials found, endpoint unreachable; never the credentials.
            print(f"probe-server: cannot reach MTurk: {e}", file=sys.stderr)
            return EXIT_FAILURE

    return run


def _run(args: argparse.Namespace, body: Callable[[Requester], Any]) -> int:
    from ..cli import run_async
    from .requester import open_requester

    experiment = load_experiment(args.experiment)
    target = _target(args)

    async def go() -> int:
        async with open_requester(experiment, target, database=args.db, progress=True) as requester:
            result: int = await body(requester)
            return result

    return run_async(go())


def _database(args: argparse.Namespace, experiment: Experiment) -> Path:
    return Path(args.db) if args.db else experiment.resolve(experiment.database)


# -- publish -------------------------------------------------------------------------


def print_plan(plan: Plan, target: Target) -> None:
    print(
        f"{'batch':<20} {'reward':>7} {'countries':<12} {'new HITs':<22} {'fees':>9} {'cost':>10}"
    )
    for planned in plan.batches:
        batch = planned.batch
        sizes = planned.new_sizes
        if not sizes:
            layout = "published"
        elif len(set(sizes)) == 1:
            layout = f"{len(sizes)} x {sizes[0]} assignments"
        else:
            layout = f"{len(sizes)} HITs of {min(sizes)}-{max(sizes)}"
        cost = planned.cost
        print(
            f"{batch.name:<20} {fees.dollars(batch.reward_amount):>7}"
            f" {' '.join(batch.countries) or 'any':<12} {layout:<22}"
            f" {fees.dollars(cost.fees):>9} {fees.dollars(cost.total):>10}"
        )
    cost = plan.cost
    print(
        f"total: {plan.new_hits} new HITs, {cost.assignments} assignments: rewards"
        f" {fees.dollars(cost.rewards)} + MTurk fees {fees.dollars(cost.fees)}"
        f" = {fees.dollars(cost.total)} if every assignment is approved"
        + ("" if target.live else " (nothing is paid in the sandbox)")
    )


@handled
def cmd_publish(args: argparse.Namespace) -> int:
    async def body(requester: Requester) -> int:
        target = requester.target
        print(
            f"Experiment {requester.experiment.name} on the {_describe_target(target)};"
            f" database {_database(args, requester.experiment)}"
        )
        plan = await requester.plan(split=bool(args.split), batches=args.batch)
        if requester.experiment.kind == "tool":
            print(SOFTWARE_TERMS_WARNING, file=sys.stderr)
            if target.live and not args.software_terms_checked and plan.new_hits:
                print(
                    f"Not published: a live HIT that asks workers to download software needs"
                    f" {TERMS_FLAG}, to say that you have checked MTurk's current terms.",
                    file=sys.stderr,
                )
                return EXIT_NOT_CONFIRMED
        print_plan(plan, target)
        if plan.new_hits == 0:
            print("Nothing to publish: every HIT of these batches is published already.")
            return EXIT_OK
        if plan.has_large_hits and args.split is None:
            split_plan = await requester.plan(split=True, batches=args.batch)
            saving = plan.cost.total - split_plan.cost.total
            print(
                f"HITs of 10 or more assignments pay MTurk 40% instead of 20%. Split into HITs"
                f" of at most {fees.SMALL_HIT_MAX} assignments to pay"
                f" {fees.dollars(split_plan.cost.total)}, saving {fees.dollars(saving)};"
                " --split does it, --no-split keeps it. Each worker is still kept to one HIT"
                " per batch: MTurk's exclusion takes effect for a worker once `hits sync` has"
                " granted it, and until then the survey page turns away a worker's second HIT"
                " and review pays only the first."
            )
            if target.live and not args.yes and ask("Split the batches? [y/N] "):
                plan = split_plan
                print_plan(plan, target)
        if target.live:
            balance = await requester.balance()
            print(f"Account balance: ${balance.available}")
            cost = fees.dollars(plan.cost.total)
            short = _short_of(balance.available, plan.cost.total)
            if short:
                # MTurk takes each approval's reward and fee from the balance
                # and refuses the approval once it cannot (and may refuse to
                # create HITs): published work that cannot be paid.
                print(
                    f"WARNING: the account balance ${balance.available} does not cover the"
                    f" cost, up to {cost}. MTurk refuses to approve assignments once the"
                    " balance runs out; add funds before the workers finish.",
                    file=sys.stderr,
                )
            if short or not args.yes:
                question = (
                    f"Publish {plan.new_hits} HITs on the LIVE MTurk site, costing up to"
                    f" {cost}? [y/N] "
                )
                if short:
                    question = (
                        f"The balance does not cover it. Publish {plan.new_hits} HITs on the LIVE"
                        f" MTurk site anyway, costing up to {cost}? [y/N] "
                    )
                if not ask(question):
                    needs = (
                        "a yes on a terminal (--yes does not answer this)"
                        if short
                        else "a yes on a terminal, or --yes"
                    )
                    why = (
                        "the balance is short, so a live publish needs"
                        if short
                        else "a live publish needs"
                    )
                    print(f"Not published: {why} {needs}.", file=sys.stderr)
                    return EXIT_NOT_CONFIRMED
        published = await requester.publish(plan)
        created = sum(1 for hit in published if hit.created)
        print(
            f"Published {created} new HITs"
            + (
                f" ({len(published) - created} found already created)"
                if created < len(published)
                else ""
            )
            + "."
        )
        for batch in dict.fromkeys(hit.batch for hit in published):
            of_batch = [hit for hit in published if hit.batch == batch]
            ids = ", ".join(hit.hit_id for hit in of_batch[:3])
            more = f" and {len(of_batch) - 3} more" if len(of_batch) > 3 else ""
            print(
                f"  {batch}: {len(of_batch)} HITs,"
                f" {sum(hit.max_assignments for hit in of_batch)} assignments ({ids}{more})"
            )
            for group in dict.fromkeys(hit.hit_group_id for hit in of_batch):
                if url := requester.preview_url(group):
                    print(f"    workers see it at {url}")
        return EXIT_OK

    return _run(args, body)


# -- the other hits commands -----------------------------------------------------------


@handled
def cmd_status(args: argparse.Namespace) -> int:
    async def body(requester: Requester) -> int:
        statuses = await requester.status(args.batch)
        print(f"HITs of {requester.experiment.name} on the {_describe_target(requester.target)}")
        header = ("batch", "HITs", "available", "pending", "submitted", "approved", "rejected")
        print(f"{header[0]:<20}" + "".join(f" {h:>9}" for h in header[1:]))
        for s in statuses:
            values = (s.hits, s.available, s.pending, s.submitted, s.approved, s.rejected)
            print(f"{s.batch:<20}" + "".join(f" {v:>9}" for v in values))
        return EXIT_OK

    return _run(args, body)


@handled
def cmd_sync(args: argparse.Namespace) -> int:
    async def body(requester: Requester) -> int:
        report = await requester.sync()
        print(
            f"Synced {report.assignments} assignments ({report.new} new) of {report.hits} HITs"
            f" from the {_describe_target(requester.target)}; exclusion granted to"
            f" {report.granted} more workers."
        )
        return EXIT_OK

    return _run(args, body)


@handled
def cmd_review(args: argparse.Namespace) -> int:
    async def body(requester: Requester) -> int:
        decisions = await requester.review(approve_all=args.approve_all, dry_run=args.dry_run)
        for d in decisions:
            outcome = f" FAILED: {d.error}" if d.error else ""
            print(
                f"{d.action:<8} {d.assignment_id} {d.batch} worker {d.worker_id}:"
                f" {d.reason}{outcome}"
            )
        counts = {
            a: sum(1 for d in decisions if d.action == a) for a in ("approve", "reject", "skip")
        }
        failed = sum(1 for d in decisions if d.error)
        verb = "Would approve" if args.dry_run else "Approved"
        print(
            f"{verb} {counts['approve']}, {'would reject' if args.dry_run else 'rejected'}"
            f" {counts['reject']}, left {counts['skip']} for you to decide"
            + (f"; {failed} refused by MTurk, left as they were for a later run" if failed else "")
            + (" (dry run: nothing was sent)" if args.dry_run else "")
            + "."
        )
        return EXIT_FAILURE if failed else EXIT_OK

    return _run(args, body)


@handled
def cmd_expire(args: argparse.Namespace) -> int:
    async def body(requester: Requester) -> int:
        expired = await requester.expire(args.batch)
        if not expired:
            print("No published HITs to expire.")
        for batch, count in expired.items():
            print(f"Expired {count} HITs of batch {batch}.")
        return EXIT_OK

    return _run(args, body)


@handled
def cmd_balance(args: argparse.Namespace) -> int:
    from ..cli import run_async
    from .requester import account_balance, mturk_client

    target = _target(args)

    async def go() -> int:
        async with mturk_client(target) as client:
            balance = await account_balance(client)
        held = f" (on hold ${balance.on_hold})" if balance.on_hold else ""
        print(f"Available balance on the {_describe_target(target)}: ${balance.available}{held}")
        return EXIT_OK

    return run_async(go())


@handled
def cmd_fake(args: argparse.Namespace) -> int:
    from ..cli import run_async
    from ..config import parse_endpoint
    from .fake import run_fake

    try:
        address, port = parse_endpoint(args.listen)
    except ValueError as e:
        raise RequesterError(f"--listen: {e}") from None

    def ready(url: str) -> None:
        print(
            "\nFake MTurk is running (Ctrl-C stops it). Nothing leaves this machine.\n"
            f"  Requester API:  probe-server hits ... --endpoint-url {url}\n"
            f"  Worker site:    {url}/\n"
            "  In the probe server's config, so its answer page may hand on to it:\n"
            f'    [mturk]\n    rehearsal_worker_sites = ["{url}"]\n'
            "  Any credentials work, e.g. AWS_ACCESS_KEY_ID=fake AWS_SECRET_ACCESS_KEY=fake\n",
            flush=True,
        )

    return run_async(run_fake(address, port, ready, args.balance))


# -- the parser ------------------------------------------------------------------------


def add_commands(commands: Any) -> None:
    """Add ``hits`` and ``fake-mturk`` to the top-level subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--live",
        action="store_true",
        help="use the real, paying MTurk site (default: the sandbox)",
    )
    common.add_argument(
        "--endpoint-url",
        type=_endpoint,
        metavar="URL",
        help="requester API endpoint, e.g. a local `probe-server fake-mturk`",
    )
    common.add_argument("--profile", help="AWS profile (default: the standard credential chain)")
    experiment = argparse.ArgumentParser(add_help=False, parents=[common])
    experiment.add_argument("experiment", metavar="EXPERIMENT", help="experiment file (TOML)")
    experiment.add_argument(
        "--db", metavar="PATH", help="probe server database (default: the experiment's database)"
    )

    hits = commands.add_parser("hits", help="publish and manage the experiment's MTurk HITs")
    # What hits prints is for the researcher; INFO logs would break up its
    # tables and progress bars (--log-level INFO brings them back).
    hits.set_defaults(default_log_level="WARNING")
    actions = hits.add_subparsers(dest="action", required=True, metavar="ACTION")

    publish = actions.add_parser(
        "publish", parents=[experiment], help="create the batches' HITs (idempotent)"
    )
    publish.add_argument("batch", nargs="*", metavar="BATCH", help="only these batches")
    split = publish.add_mutually_exclusive_group()
    split.add_argument(
        "--split",
        action="store_true",
        default=None,
        help="HITs of at most 9 assignments (20%% fee instead of 40%%)",
    )
    split.add_argument("--no-split", dest="split", action="store_false", help="one HIT per batch")
    publish.add_argument(
        "--yes", action="store_true", help="do not ask before a live publish (for scripts)"
    )
    publish.add_argument(
        TERMS_FLAG,
        action="store_true",
        help='kind = "tool" only: you have checked that MTurk\'s current terms allow HITs'
        " that ask workers to download software (required for --live)",
    )
    publish.set_defaults(func=cmd_publish, split=None)

    status = actions.add_parser(
        "status", parents=[experiment], help="per batch: available, pending, submitted, ..."
    )
    status.add_argument("batch", nargs="*", metavar="BATCH", help="only these batches")
    status.set_defaults(func=cmd_status)

    sync = actions.add_parser(
        "sync", parents=[experiment], help="fetch assignments and answers; grant exclusion"
    )
    sync.set_defaults(func=cmd_sync)

    review = actions.add_parser(
        "review",
        parents=[experiment],
        help="apply each kind's rule: right red counts, stored speed-test or tool reports",
    )
    review.add_argument(
        "--approve-all",
        action="store_true",
        help="approve every submission but a repeat worker's later ones",
    )
    review.add_argument("--dry-run", action="store_true", help="print the decisions only")
    review.set_defaults(func=cmd_review)

    expire = actions.add_parser("expire", parents=[experiment], help="expire the batches' HITs now")
    expire.add_argument("batch", nargs="*", metavar="BATCH", help="only these batches")
    expire.set_defaults(func=cmd_expire)

    balance = actions.add_parser("balance", parents=[common], help="the account's balance")
    balance.set_defaults(func=cmd_balance)

    fake = commands.add_parser(
        "fake-mturk", help="run a local fake MTurk to rehearse an experiment offline"
    )
    fake.add_argument(
        "--listen",
        default=DEFAULT_FAKE_LISTEN,
        metavar="ADDRESS:PORT",
        help=f"loopback (or lab documentation-range) address and port"
        f" (default {DEFAULT_FAKE_LISTEN})",
    )
    fake.add_argument(
        "--balance",
        type=_dollars,
        metavar="DOLLARS",
        help="an account balance that approvals pay from and can run out"
        " (default: like the sandbox, $10,000 that never runs out)",
    )
    fake.set_defaults(func=cmd_fake)


__all__: Sequence[str] = ["add_commands", "ask"]
