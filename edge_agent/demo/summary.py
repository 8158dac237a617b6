"""The demo's summary: figures that add up, each saying what it counts.

The buffer holds more events than the products published: the agent writes events of its
own (``suggestion.shown`` for every suggestion, ``suggestion.accepted`` when a shopper
picks a suggested item up), and the serial shelf and the shoppers' reactions add input.
The summary shows each part, so that ``events_collected`` is their visible sum.
"""

from __future__ import annotations

from typing import Any

from edge_agent.demo.products import Products


def summarize(
    status: dict[str, Any], products: Products, elapsed: float, journey_messages: int = 0
) -> dict[str, Any]:
    """The summary as JSON-ready figures (``edge-agent demo`` prints it last)."""
    sources = status["sources"]
    accepted = sum(int(figures["accepted"]) for figures in sources.values())
    total = int(status["buffer"]["total"])
    return {
        "duration_s": round(elapsed, 1),
        "mqtt_published": {
            "by_products": products.published,
            "of_which_malformed_on_purpose": products.malformed,
            "shopper_reactions": products.accepted_by_shoppers,
            "cross_store_customer": journey_messages,
        },
        "sources": {
            name: {
                "received": figures["received"],
                "accepted": figures["accepted"],
                "quarantined": figures["quarantined"],
                "connected": figures["connected"],
            }
            for name, figures in sources.items()
        },
        "accepted_from_sources": accepted,
        "recorded_by_agent": max(0, total - accepted),
        "events_collected": total,
        "quarantined": status["quarantine"]["total"],
        "quarantined_by_reason": dict(status["quarantine"].get("by_reason", {})),
        "suggestions_shown": status["suggestions"]["shown"],
        "suggestions_accepted": status["suggestions"]["accepted"],
        "synced": status["sync"]["sent"],
        "sync_lag_s": status["sync"]["lag_s"],
    }


def explain(summary: dict[str, Any]) -> list[str]:
    """The same figures in sentences, for a person (printed before the JSON)."""
    published = summary["mqtt_published"]
    lines = [
        f"In {summary['duration_s']:.0f} s the simulated products published "
        f"{published['by_products']} MQTT messages, {published['of_which_malformed_on_purpose']}"
        " of them malformed on purpose (a firmware bug's truncated JSON: quarantined, as they"
        f" should be, not an error), and shoppers reacted to {published['shopper_reactions']}"
        " suggestions.",
        "Per source, received -> accepted (committed to the buffer) + quarantined:",
    ]
    for name, figures in summary["sources"].items():
        lines.append(
            f"  {name}: {figures['received']} -> {figures['accepted']} + {figures['quarantined']}"
        )
    lines += [
        f"The buffer holds {summary['events_collected']} events = "
        f"{summary['accepted_from_sources']} accepted from the sources + "
        f"{summary['recorded_by_agent']} the agent recorded itself (suggestion.shown for each"
        " suggestion, suggestion.accepted when a suggested item was picked up).",
        f"Suggestions: {summary['suggestions_shown']} shown, "
        f"{summary['suggestions_accepted']} accepted. Central store: "
        f"{summary['synced']} events acknowledged (sync lag {summary['sync_lag_s']} s).",
    ]
    travelled = summary.get("cross_store_customer")
    if travelled and travelled.get("completed"):
        history = travelled.get("history") or {}
        lines.append(
            f"Cross-store customer {travelled['customer']}: shopped at {travelled['shopped_at']}"
            f" and in the web shop ({travelled['web_shop_items']} items), then was recognised at"
            f" {travelled['recognised_at']}: its suggestion came from the"
            f" {travelled['suggestion_source']} with {history.get('local', 0)} interactions from"
            f" this store and {history.get('central', 0)} from elsewhere (the central profile;"
            " the live page's Recent suggestions say 'here' / 'elsewhere')."
        )
    elif travelled:
        lines.append(f"Cross-store customer: not shown ({travelled.get('reason')}).")
    if summary.get("data_dir"):
        lines.append(f"Data kept in {summary['data_dir']}.")
    else:
        lines.append("The temporary data directory was removed (--keep-data keeps it).")
    return lines
