// The storefront: plain JavaScript on the gateway's HTTP/JSON API (no build step).
// Menu: GET /v1/items. Sign-up: POST /v1/users. Login: POST /v1/users:login.
// Order: POST /v1/orders with the token. Status: GET /v1/orders/{id}:watch, read as
// newline-delimited JSON while the order changes.
"use strict";

const state = { token: sessionStorage.getItem("token"), user: sessionStorage.getItem("user"),
                cart: new Map(), items: new Map() };

const $ = (id) => document.getElementById(id);
const money = (cents, currency) =>
  new Intl.NumberFormat("en", { style: "currency", currency }).format(Number(cents) / 100);

async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const response = await fetch(path, { method, headers,
                                        body: body === undefined ? undefined : JSON.stringify(body) });
  const document = await response.json();
  if (!response.ok) throw new Error(document.message || `HTTP ${response.status}`);
  return document;
}

async function loadMenu() {
  const items = [];
  let pageToken = "";
  do {
    const page = await api("GET", `/v1/items?pageSize=100&pageToken=${encodeURIComponent(pageToken)}`);
    items.push(...(page.items || []));
    pageToken = page.nextPageToken || "";
  } while (pageToken);
  const byRestaurant = new Map();
  for (const item of items) {
    state.items.set(item.itemId, item);
    if (!byRestaurant.has(item.restaurantId)) byRestaurant.set(item.restaurantId, []);
    byRestaurant.get(item.restaurantId).push(item);
  }
  const menu = $("menu");
  menu.replaceChildren();
  for (const [restaurant, dishes] of byRestaurant) {
    const block = document.createElement("div");
    block.className = "restaurant";
    const title = document.createElement("h3");
    title.textContent = restaurant;
    block.append(title);
    for (const item of dishes) {
      const row = document.createElement("div");
      row.className = "item";
      row.dataset.itemId = item.itemId;
      const text = document.createElement("div");
      text.innerHTML = `<strong></strong> <span class="price"></span><div class="description"></div>`;
      text.querySelector("strong").textContent = item.name;
      text.querySelector(".price").textContent = money(item.priceCents, item.currency);
      text.querySelector(".description").textContent = item.description || "";
      const add = document.createElement("button");
      add.textContent = item.available ? "Add" : "Sold out";
      add.disabled = !item.available;
      add.addEventListener("click", () => addToCart(item.itemId));
      row.append(text, add);
      block.append(row);
    }
    menu.append(block);
  }
  $("menu-status").textContent = `${items.length} dishes`;
}

function addToCart(itemId) {
  state.cart.set(itemId, (state.cart.get(itemId) || 0) + 1);
  renderCart();
}

function renderCart() {
  const list = $("cart");
  list.replaceChildren();
  let total = 0, currency = "EUR";
  for (const [itemId, quantity] of state.cart) {
    const item = state.items.get(itemId);
    total += Number(item.priceCents) * quantity;
    currency = item.currency;
    const entry = document.createElement("li");
    entry.textContent = `${quantity} × ${item.name}`;
    list.append(entry);
  }
  $("total").textContent = state.cart.size ? `Total ${money(total, currency)}` : "Nothing yet";
  $("place").disabled = !state.cart.size || !state.token;
}

function signedIn(login) {
  state.token = login.accessToken;
  state.user = login.userId;
  sessionStorage.setItem("token", state.token);
  sessionStorage.setItem("user", state.user);
  $("who").textContent = `Signed in as ${state.user}`;
  renderCart();
}

function formValues(form) {
  return Object.fromEntries(new FormData(form).entries());
}

$("signup").addEventListener("submit", async (event) => {
  event.preventDefault();
  const values = formValues(event.target);
  try {
    await api("POST", "/v1/users", values);
    signedIn(await api("POST", "/v1/users:login", { email: values.email, password: values.password }));
    $("account-message").textContent = "Welcome!";
  } catch (error) {
    $("account-message").textContent = error.message;
  }
});

$("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    signedIn(await api("POST", "/v1/users:login", formValues(event.target)));
    $("account-message").textContent = "Welcome back!";
  } catch (error) {
    $("account-message").textContent = error.message;
  }
});

$("place").addEventListener("click", async () => {
  $("order-message").textContent = "Placing your order…";
  const lines = [...state.cart].map(([itemId, quantity]) => ({ itemId, quantity }));
  try {
    const order = await api("POST", "/v1/orders", {
      lines, deliveryAddress: $("address").value, paymentMethod: $("card").value,
      idempotencyKey: crypto.randomUUID(),
    });
    state.cart.clear();
    renderCart();
    $("order-message").textContent = "";
    track(order.orderId);
  } catch (error) {
    $("order-message").textContent = error.message;
  }
});

function showStatus(order) {
  const status = (order.status || "").replace("ORDER_STATUS_", "");
  $("order-status").textContent = status;
  const step = document.createElement("li");
  step.textContent = status + (order.rejectionReason ? ` (${order.rejectionReason})` : "");
  $("order-history").append(step);
}

async function track(orderId) {
  $("tracking").hidden = false;
  $("order-id").textContent = orderId;
  $("order-history").replaceChildren();
  const response = await fetch(`/v1/orders/${encodeURIComponent(orderId)}:watch`,
                               { headers: { Authorization: `Bearer ${state.token}` } });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += value;
    let newline;
    while ((newline = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, newline);
      buffered = buffered.slice(newline + 1);
      if (!line.trim()) continue;
      const message = JSON.parse(line);
      if (message.result) showStatus(message.result);
      if (message.error) $("order-status").textContent = `error: ${message.error.message}`;
    }
  }
}

if (state.token) $("who").textContent = `Signed in as ${state.user}`;
loadMenu().catch((error) => { $("menu-status").textContent = error.message; $("menu-status").className = "error"; });
renderCart();
