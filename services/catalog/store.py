"""The catalog's menu, kept in its database (SQLite or Postgres) and shared by every catalog
instance.

A fresh database is seeded with a small demo menu so that a platform started by hand has
something to order. Seeding happens once per database, not once per process: a `meta` row
records the seeded version, and the check and the inserts share one write transaction, so a
second instance (or two instances starting together) never seeds twice, and an operator's
later edits (a new price, an item taken off the menu) survive restarts.

Every change of the menu is recorded as an event (ItemChanged, RestaurantChanged) in the
outbox (meshkit.events.store: one stream per item or restaurant) in the transaction of the
change, and relayed to the CATALOG stream: read models keep the names they show from it. A
database seeded before the catalog had events gets the events of its whole menu once, the
same way the seed is made once (`meta` key `events_seeded`).

Listing uses keyset pagination on item_id (`WHERE item_id > ?`), not OFFSET: a page costs the
same wherever it is, and items added or removed between pages neither repeat nor skip others.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Self

import sqlalchemy as sa
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from foodmesh.catalog.v1 import catalog_pb2, events_pb2
from meshkit.events import EventStore, relay
from meshkit.events import store as event_store
from meshkit.storage import lease
from meshkit.storage.database import DatabaseStore, Row, SqlTransaction, open_database
from meshkit.storage.schema import BigInt, Schema


@dataclass(frozen=True, slots=True)
class CatalogItem:
    """One item on a restaurant's menu; prices in the currency's minor unit."""

    item_id: str
    restaurant_id: str
    name: str
    description: str
    price_cents: int
    currency: str
    available: bool


@dataclass(frozen=True, slots=True)
class ItemPage:
    """Up to `limit` items in item_id order, and whether more items follow the last one."""

    items: tuple[CatalogItem, ...]
    has_more: bool


SEED_VERSION = "demo-menu-1"
DEMO_CURRENCY = "EUR"
DEMO_RESTAURANTS = {
    "trattoria-roma": "Trattoria Roma",
    "sakura-sushi": "Sakura Sushi",
    "green-bowl": "Green Bowl",
}
DEMO_RESTAURANT_IDS = tuple(DEMO_RESTAURANTS)


def _demo_item(
    item_id: str,
    restaurant_id: str,
    name: str,
    description: str,
    price_cents: int,
    *,
    available: bool = True,
) -> CatalogItem:
    return CatalogItem(
        item_id, restaurant_id, name, description, price_cents, DEMO_CURRENCY, available
    )


DEMO_MENU: tuple[CatalogItem, ...] = (
    _demo_item("roma-margherita", "trattoria-roma", "Margherita", "Tomato, mozzarella, basil", 850),
    _demo_item(
        "roma-carbonara", "trattoria-roma", "Spaghetti Carbonara", "Guanciale, egg, pecorino", 1250
    ),
    _demo_item("roma-tiramisu", "trattoria-roma", "Tiramisu", "Made in house", 600),
    _demo_item(
        "roma-truffle-risotto",
        "trattoria-roma",
        "Truffle Risotto",
        "Seasonal: back in autumn",
        2400,
        available=False,
    ),
    _demo_item("sakura-salmon-nigiri", "sakura-sushi", "Salmon Nigiri", "Two pieces", 550),
    _demo_item(
        "sakura-dragon-roll",
        "sakura-sushi",
        "Dragon Roll",
        "Eel, avocado, cucumber; eight pieces",
        1450,
    ),
    _demo_item("sakura-miso-soup", "sakura-sushi", "Miso Soup", "Tofu, wakame", 350),
    _demo_item("green-falafel-wrap", "green-bowl", "Falafel Wrap", "Hummus, pickles", 900),
    _demo_item(
        "green-quinoa-bowl", "green-bowl", "Quinoa Bowl", "Roasted vegetables, tahini", 1100
    ),
    _demo_item("green-lemonade", "green-bowl", "Mint Lemonade", "0.4 l", 400),
)

_METADATA = sa.MetaData()
SCHEMA = (
    Schema.of(
        "catalog",
        sa.Table(
            "meta",
            _METADATA,
            sa.Column("key", sa.Text, primary_key=True),
            sa.Column("value", sa.Text, nullable=False),
        ),
        sa.Table(
            "items",
            _METADATA,
            sa.Column("item_id", sa.Text, primary_key=True),
            sa.Column("restaurant_id", sa.Text, nullable=False),
            sa.Column("name", sa.Text, nullable=False),
            sa.Column("description", sa.Text, nullable=False, server_default=""),
            sa.Column(
                "price_cents", BigInt, sa.CheckConstraint("price_cents >= 0"), nullable=False
            ),
            sa.Column("currency", sa.Text, nullable=False),
            sa.Column(
                "available", BigInt, sa.CheckConstraint("available IN (0, 1)"), nullable=False
            ),
            sa.Index("items_by_restaurant", "restaurant_id", "item_id"),
        ),
        sa.Table(
            "restaurants",
            _METADATA,
            sa.Column("restaurant_id", sa.Text, primary_key=True),
            sa.Column("name", sa.Text, nullable=False),
        ),
    ),
    event_store.SCHEMA,
    lease.SCHEMA,
    relay.SCHEMA,
)

EVENT_TYPES: tuple[type[Message], ...] = (events_pb2.ItemChanged, events_pb2.RestaurantChanged)
OUTBOX = EventStore(EVENT_TYPES)
"""The menu's changes, a stream per item and per restaurant: the outbox the relay publishes
(CATALOG)."""

_ITEM_COLUMNS = "item_id, restaurant_id, name, description, price_cents, currency, available"


class CatalogStore(DatabaseStore):
    """Reads the menu; seeds the demo menu into a database that was never seeded."""

    @classmethod
    async def open(
        cls,
        location: Path | str,
        *,
        seed: tuple[CatalogItem, ...] = DEMO_MENU,
        restaurants: dict[str, str] = DEMO_RESTAURANTS,
    ) -> Self:
        """Open (or create) the catalog database at `location` (a SQLite file's path or a
        `postgresql://` URL); seed it if no instance has yet."""
        database = await open_database(location, schema=SCHEMA)
        try:
            async with database.transaction() as transaction:
                await _seed_once(transaction, seed, restaurants)
                await _publish_menu_once(transaction)
        except BaseException:
            await database.close()
            raise
        return cls(database)

    async def get_item(self, item_id: str) -> CatalogItem | None:
        """The item with this id, or None."""
        row = await self._database.fetch_one(
            f"SELECT {_ITEM_COLUMNS} FROM items WHERE item_id = ?", (item_id,)
        )
        return None if row is None else _item_from_row(row)

    async def list_items(self, restaurant_id: str, after_item_id: str, limit: int) -> ItemPage:
        """Up to limit items with item_id > after_item_id ("" = from the start), in item_id
        order, of one restaurant or of all restaurants when restaurant_id is ""."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        where = "item_id > ?"
        parameters: list[str | int] = [after_item_id]
        if restaurant_id:
            where += " AND restaurant_id = ?"
            parameters.append(restaurant_id)
        rows = await self._database.fetch_all(
            f"SELECT {_ITEM_COLUMNS} FROM items WHERE {where} ORDER BY item_id LIMIT ?",
            (*parameters, limit + 1),
        )
        items = tuple(_item_from_row(row) for row in rows[:limit])
        return ItemPage(items=items, has_more=len(rows) > limit)

    async def put_item(self, item: CatalogItem) -> CatalogItem:
        """Add or replace the item, and record ItemChanged when anything changed. KeyError
        naming restaurant_id for an unknown restaurant; ItemMoved when the item is another
        restaurant's."""
        async with self._database.transaction() as transaction:
            if (
                await transaction.fetch_one(
                    "SELECT 1 FROM restaurants WHERE restaurant_id = ?", (item.restaurant_id,)
                )
                is None
            ):
                raise KeyError(item.restaurant_id)
            row = await transaction.fetch_one(
                f"SELECT {_ITEM_COLUMNS} FROM items WHERE item_id = ?", (item.item_id,)
            )
            current = None if row is None else _item_from_row(row)
            if current == item:
                return item
            if current is not None and current.restaurant_id != item.restaurant_id:
                raise ItemMoved(current)
            await transaction.execute(
                f"INSERT INTO items ({_ITEM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (item_id) DO UPDATE SET restaurant_id = excluded.restaurant_id,"
                " name = excluded.name, description = excluded.description,"
                " price_cents = excluded.price_cents, currency = excluded.currency,"
                " available = excluded.available",
                _item_row(item),
            )
            await OUTBOX.append_next(transaction, item.item_id, [_item_changed(item)])
        return item


class ItemMoved(Exception):
    """The item exists at another restaurant."""

    def __init__(self, current: CatalogItem) -> None:
        super().__init__(current.restaurant_id)
        self.current = current


def _item_row(i: CatalogItem) -> tuple[str, str, str, str, int, str, int]:
    return (
        i.item_id, i.restaurant_id, i.name, i.description, i.price_cents, i.currency,
        int(i.available),
    )  # fmt: skip


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def _item_changed(item: CatalogItem) -> events_pb2.ItemChanged:
    message = catalog_pb2.Item(
        item_id=item.item_id,
        restaurant_id=item.restaurant_id,
        name=item.name,
        description=item.description,
        price_cents=item.price_cents,
        currency=item.currency,
        available=item.available,
    )
    return events_pb2.ItemChanged(item=message, change_time=_now())


async def _publish_menu_once(transaction: SqlTransaction) -> None:
    """The events of the whole menu, once per database (a fresh seed, or a database seeded
    before the catalog had events)."""
    published = await transaction.fetch_one("SELECT value FROM meta WHERE key = 'events_seeded'")
    if published is not None:
        return
    now = _now()
    for row in await transaction.fetch_all(
        "SELECT restaurant_id, name FROM restaurants ORDER BY restaurant_id"
    ):
        event = events_pb2.RestaurantChanged(
            restaurant_id=row["restaurant_id"], name=row["name"], change_time=now
        )
        await OUTBOX.append_next(transaction, row["restaurant_id"], [event])
    for row in await transaction.fetch_all(f"SELECT {_ITEM_COLUMNS} FROM items ORDER BY item_id"):
        await OUTBOX.append_next(transaction, row["item_id"], [_item_changed(_item_from_row(row))])
    await transaction.execute("INSERT INTO meta (key, value) VALUES ('events_seeded', '1')")


async def _seed_once(
    transaction: SqlTransaction, items: tuple[CatalogItem, ...], restaurants: dict[str, str]
) -> None:
    # The restaurants' names came after the first seed: a database seeded before gets them.
    await transaction.execute_many(
        "INSERT INTO restaurants (restaurant_id, name) VALUES (?, ?)"
        " ON CONFLICT (restaurant_id) DO NOTHING",
        list(restaurants.items()),
    )
    seeded = await transaction.fetch_one("SELECT value FROM meta WHERE key = 'seed_version'")
    if seeded is not None:
        return
    await transaction.execute_many(
        f"INSERT INTO items ({_ITEM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (item_id) DO NOTHING",
        [_item_row(i) for i in items],
    )
    await transaction.execute(
        "INSERT INTO meta (key, value) VALUES ('seed_version', ?)", (SEED_VERSION,)
    )


def _item_from_row(row: Row) -> CatalogItem:
    return CatalogItem(
        item_id=row["item_id"],
        restaurant_id=row["restaurant_id"],
        name=row["name"],
        description=row["description"],
        price_cents=row["price_cents"],
        currency=row["currency"],
        available=bool(row["available"]),
    )
