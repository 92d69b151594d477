// The trading page: plain modern JavaScript, no build step, no dependencies.
//
// It talks only to the public endpoints: the order gateway, the market-data feed (l2 channel) and the
// trade feed over WebSocket, and this page's own server for /api/config and /api/latency.
// Every message updates the model at once; the screen is redrawn at most once per animation frame,
// and only the parts whose data changed. Prices and quantities stay decimal strings, compared and
// summed as BigInt units of the tick or lot: a float only ever becomes a pixel coordinate.

"use strict";

const LADDER_ROWS = 12; // levels shown per side
const DEPTH_LEVELS = 60; // levels per side drawn in the depth chart
const TAPE_ROWS = 60;
const CANDLE_MS = 60_000;
const MAX_CANDLES = 240; // kept in memory; the chart draws what fits
const LATENCY_EVERY_MS = 2000;
const BALANCES_SETTLE_MS = 250; // quiet time after balance lines before the balances are asked again

const stats = { frames: 0, renders: 0, maxRenderMs: 0, l2Updates: 0, snapshots: 0, resyncs: 0, trades: 0, reports: 0 };

// --- exact decimals -------------------------------------------------------------------------------

function decimalsOf(step) {
  const text = String(step);
  const exp = /[eE]-(\d+)$/.exec(text);
  if (exp) return Number(exp[1]) + decimalsOf(text.slice(0, exp.index)); // "1E-7"
  const dot = text.indexOf(".");
  return dot < 0 ? 0 : text.length - dot - 1;
}

/** "100.5" -> 10050n for 2 decimals; null for anything that is not a plain decimal on that grid. */
function toUnits(text, dec) {
  const m = /^(\d*)(?:\.(\d*))?$/.exec(String(text).trim());
  if (!m || (m[1] === "" && !m[2])) return null;
  let frac = m[2] || "";
  if (frac.length > dec) {
    if (/[^0]/.test(frac.slice(dec))) return null;
    frac = frac.slice(0, dec);
  }
  return BigInt((m[1] || "0") + frac.padEnd(dec, "0"));
}

function fromUnits(units, dec) {
  const neg = units < 0n;
  const digits = (neg ? -units : units).toString().padStart(dec + 1, "0");
  const text = dec ? `${digits.slice(0, -dec)}.${digits.slice(-dec)}` : digits;
  return neg ? `-${text}` : text;
}

/** Trailing zeros off, but keep at least `keep` decimals. */
function trim(text, keep) {
  const dot = text.indexOf(".");
  if (dot < 0) return text;
  let end = text.length;
  while (end > dot + 1 + keep && text[end - 1] === "0") end--;
  return text.slice(0, end === dot + 1 ? dot : end);
}

const isZero = (q) => /^0*\.?0*$/.test(q);
const asNumber = (units, dec) => Number(units) / 10 ** dec; // for pixel coordinates only

// --- model ----------------------------------------------------------------------------------------

class Book {
  constructor(pdec) {
    this.pdec = pdec;
    this.bids = new Map(); // price string -> {p, u, q}
    this.asks = new Map();
    this.seq = null;
    this.ready = false;
    this.sorted = null;
  }

  snapshot(msg) {
    this.bids.clear();
    this.asks.clear();
    for (const [p, q] of msg.bids) this.bids.set(p, { p, u: toUnits(p, this.pdec), q });
    for (const [p, q] of msg.asks) this.asks.set(p, { p, u: toUnits(p, this.pdec), q });
    this.seq = msg.seq;
    this.ready = true;
    this.sorted = null;
  }

  apply(changes) {
    for (const [side, p, q] of changes) {
      const levels = side === "buy" ? this.bids : this.asks;
      if (isZero(q)) levels.delete(p);
      else {
        const level = levels.get(p);
        if (level) level.q = q;
        else levels.set(p, { p, u: toUnits(p, this.pdec), q });
      }
    }
    this.sorted = null;
  }

  /** Both sides best first; sorted lazily, at most once per change burst. */
  levels() {
    if (!this.sorted) {
      const bids = [...this.bids.values()].sort((a, b) => (a.u > b.u ? -1 : a.u < b.u ? 1 : 0));
      const asks = [...this.asks.values()].sort((a, b) => (a.u < b.u ? -1 : a.u > b.u ? 1 : 0));
      this.sorted = { bids, asks };
    }
    return this.sorted;
  }
}

const state = {
  config: null,
  symbol: null,
  inst: null, // {pdec, qdec, spec}
  book: null,
  trades: [], // newest first
  tradeIds: new Set(),
  lastTradeId: 0,
  candles: new Map(), // open time (ms) -> candle
  last: null, // last trade {price, u, side}
  account: null,
  authed: false,
  orders: new Map(), // order_id -> the open order: from `open_orders`, then each later execution report
  ordersSynced: false, // the `open_orders` answer of this login has come
  balances: new Map(), // asset -> {available, held} (decimal strings, as the venue sends them)
  balancesOff: false, // the venue answered BALANCES_DISABLED (it runs with --risk off)
  side: "buy",
  pendingTape: [],
};

const dirty = { book: false, tape: false, candles: false, orders: false, balances: false };
function invalidate(...parts) {
  for (const p of parts) dirty[p] = true;
}

// --- sockets ----------------------------------------------------------------------------------------

function reachable(url) {
  // A stack bound to loopback still works when the page is opened through another name for this host.
  const u = new URL(url);
  const loop = ["127.0.0.1", "localhost", "0.0.0.0", "[::1]", "[::]"];
  if (loop.includes(u.hostname) && !loop.includes(location.hostname) && location.hostname) {
    u.hostname = location.hostname;
  }
  return u.toString();
}

class Socket {
  constructor(name, url, onOpen, onMessage) {
    this.name = name;
    this.url = reachable(url);
    this.onOpen = onOpen;
    this.onMessage = onMessage;
    this.backoff = 250;
    this.closed = false;
    this.ws = null;
    this.connect();
  }

  connect() {
    pill(this.name, "wait");
    const ws = (this.ws = new WebSocket(this.url));
    ws.onopen = () => {
      this.backoff = 250;
      pill(this.name, "up");
      this.onOpen();
    };
    ws.onmessage = (ev) => {
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      this.onMessage(msg);
    };
    ws.onclose = () => {
      pill(this.name, "down");
      if (this.closed || this.ws !== ws) return;
      setTimeout(() => this.connect(), this.backoff);
      this.backoff = Math.min(this.backoff * 2, 5000);
    };
  }

  send(msg) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(msg));
    return true;
  }

  close() {
    this.closed = true;
    if (this.ws) this.ws.close();
  }
}

let md = null;
let tradesFeed = null;
let gateway = null;

function onMd(msg) {
  if (msg.symbol !== state.symbol) return;
  const book = state.book;
  if (msg.type === "l2_snapshot") {
    book.snapshot(msg);
    stats.snapshots++;
    invalidate("book");
  } else if (msg.type === "l2_update") {
    if (!book.ready) return; // a resubscription is under way: its snapshot replaces everything
    if (msg.seq !== book.seq + 1) return resync();
    book.apply(msg.changes);
    book.seq = msg.seq;
    stats.l2Updates++;
    invalidate("book");
  } else if (msg.type === "heartbeat") {
    if (book.ready && msg.seq !== book.seq) resync();
  }
}

function resync() {
  // A gap: the local book can no longer be trusted. Start over from a fresh snapshot.
  stats.resyncs++;
  state.book.ready = false;
  md.send({ op: "unsubscribe", symbol: state.symbol, channel: "l2" });
  md.send({ op: "subscribe", symbol: state.symbol, channel: "l2" });
}

function onTrade(msg) {
  if (msg.type !== "trade" || msg.symbol !== state.symbol) return;
  if (state.tradeIds.has(msg.trade_id)) return; // a reconnect may deliver a trade again
  state.tradeIds.add(msg.trade_id);
  stats.trades++;
  const { pdec, qdec } = state.inst;
  const u = toUnits(msg.price, pdec);
  const prev = state.last;
  state.last = { price: msg.price, u, side: msg.aggressor_side, up: prev ? u >= prev.u : true };
  state.trades.unshift(msg);
  state.pendingTape.push(msg);
  if (state.trades.length > TAPE_ROWS) state.trades.length = TAPE_ROWS;
  if (state.tradeIds.size > 4 * TAPE_ROWS) state.tradeIds = new Set(state.trades.map((t) => t.trade_id));
  addToCandle(msg, u, toUnits(msg.quantity, qdec));
  invalidate("tape", "candles", "book");
}

function addToCandle(trade, u, qty) {
  const t = Math.floor(trade.ts / CANDLE_MS) * CANDLE_MS;
  let c = state.candles.get(t);
  if (!c) {
    c = { t, open: trade.price, high: trade.price, low: trade.price, close: trade.price, ou: u, hu: u, lu: u, cu: u, volume: 0n, trades: 0 };
    state.candles.set(t, c);
    if (state.candles.size > MAX_CANDLES) state.candles.delete(Math.min(...state.candles.keys()));
  }
  if (u > c.hu) [c.high, c.hu] = [trade.price, u];
  if (u < c.lu) [c.low, c.lu] = [trade.price, u];
  // The feed delivers a symbol's trades in trade_id order, so the newest trade closes the candle.
  c.close = trade.price;
  c.cu = u;
  c.volume += qty;
  c.trades++;
}

// --- the account ------------------------------------------------------------------------------------

function connectAccount(name) {
  if (gateway) gateway.close();
  state.account = name;
  state.authed = false;
  state.orders.clear();
  state.ordersSynced = false;
  state.balances.clear();
  state.balancesOff = false;
  invalidate("orders", "book", "balances");
  updateTicket();
  localStorage.setItem("cme.account", name);
  const auth = state.config.auth === "api_key" ? { op: "auth", api_key: name } : { op: "auth", account: name };
  gateway = new Socket("gateway", state.config.gateway, () => gateway.send(auth), onGateway);
}

function onGateway(msg) {
  switch (msg.type) {
    case "authenticated":
      state.authed = true;
      state.account = msg.account;
      state.ordersSynced = false;
      note(`connected as ${msg.account}`, "ok");
      updateTicket();
      // The open orders and balances as the venue has them now (also after a reload or a reconnect).
      gateway.send({ op: "open_orders" });
      askBalances();
      break;
    case "open_orders":
      // The gateway sends a connection's messages in order: a report sent before this answer is
      // already in it, so the answer replaces them. A report after it may still be older than the
      // answer, but then the order's later reports follow it (one symbol's reports come in order),
      // so applying every later report in turn ends at each order's current state.
      state.orders = new Map(msg.orders.map((o) => [o.order_id, o]));
      state.ordersSynced = true;
      invalidate("orders", "book");
      break;
    case "execution":
      applyReport(msg);
      describeReport(msg);
      break;
    case "balances":
      state.balances = new Map(Object.entries(msg.balances));
      invalidate("balances");
      break;
    case "balance":
      state.balances.set(msg.asset, { available: msg.available, held: msg.held });
      invalidate("balances");
      settleBalances();
      break;
    case "funded":
      note(`${msg.op} ${msg.amount} ${msg.asset}`, "ok");
      break;
    case "ack":
      if (msg.op === "new") note(`accepted ${msg.client_order_id || ""} → ${msg.order_id}`);
      break;
    case "reject":
      if (msg.op === "balances" && msg.code === "BALANCES_DISABLED") {
        state.balancesOff = true; // a venue without balances: nothing to show, nothing went wrong
        invalidate("balances");
        break;
      }
      note(`${msg.op || ""} rejected: ${msg.code}${msg.reason ? ` (${msg.reason})` : ""}`, "err");
      if (msg.code === "UNAUTHENTICATED" && !state.authed) {
        gateway.close(); // a wrong name or key: retrying would only be refused again
        updateTicket();
      }
      break;
    default:
      break;
  }
}

function applyReport(r) {
  stats.reports++;
  if (isOpen(r)) state.orders.set(r.order_id, r);
  else state.orders.delete(r.order_id);
  invalidate("orders", "book");
}

let balancesTimer = null;

function askBalances() {
  if (state.authed && !state.balancesOff) gateway.send({ op: "balances" });
}

/** Each `balance` line is applied at once, but lines of one asset that come from two symbols' streams
 * (USDT of BTC-USDT and of ETH-USDT) carry nothing that orders them across the two: once the lines
 * stop for a moment, the balances are asked again, and that answer is never older than a line the
 * connection already got. */
function settleBalances() {
  clearTimeout(balancesTimer);
  balancesTimer = setTimeout(askBalances, BALANCES_SETTLE_MS);
}

function describeReport(r) {
  const what = `${r.side} ${r.quantity} ${r.symbol}${r.price ? ` @ ${r.price}` : ""}`;
  if (r.exec_type === "trade") {
    note(`${r.status === "filled" ? "filled" : "partial"}: ${r.last_quantity} @ ${r.last_price} (${r.liquidity}, fee ${r.fee})`, "ok");
  } else if (r.status === "cancelled") {
    note(`cancelled ${what}${r.reason && r.reason !== "user" ? ` — ${r.reason}` : ""}`);
  } else if (r.status === "rejected") {
    note(`rejected ${what}: ${r.code}`, "err");
  } else if (r.exec_type === "amended") {
    note(`amended ${what}`);
  }
}

const isOpen = (r) => r.status === "new" || r.status === "partially_filled";

/** Order ids are stream entry ids, "<ms>-<n>": a later order has a larger one. Newest first. */
function newerFirst(a, b) {
  const [ams, an] = a.order_id.split("-").map(Number);
  const [bms, bn] = b.order_id.split("-").map(Number);
  return bms - ams || bn - an;
}

function openOrders() {
  return [...state.orders.values()].filter(isOpen).sort(newerFirst);
}

let orderSeq = 0;
function submitOrder(ev) {
  ev.preventDefault();
  if (!state.authed) return;
  const type = $("type").value;
  const msg = {
    op: "new",
    symbol: state.symbol,
    side: state.side,
    type,
    tif: $("tif").value,
    quantity: $("qty").value.trim(),
    client_order_id: `web-${Date.now().toString(36)}-${++orderSeq}`,
  };
  if (type === "limit" || type === "stop_limit") msg.price = $("price").value.trim();
  if (type === "limit" && $("post-only").checked) msg.post_only = true;
  if (type.startsWith("stop_")) msg.stop_price = $("stop-price").value.trim();
  const stop = msg.stop_price ? ` stop ${msg.stop_price}` : "";
  if (gateway.send(msg)) note(`sent ${msg.side} ${msg.quantity}${msg.price ? ` @ ${msg.price}` : " at market"}${stop} ${msg.tif}`);
}

function cancelOrder(symbol, orderId) {
  if (gateway && gateway.send({ op: "cancel", symbol, order_id: orderId })) note(`cancel ${orderId}`);
}

// --- rendering --------------------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

function pill(name, how) {
  const el = $(`conn-${name === "gateway" ? "gateway" : name}`);
  if (el) el.className = `pill ${how}`;
}

function note(text, cls = "") {
  const box = $("messages");
  const line = document.createElement("div");
  line.textContent = `${clock(Date.now())} ${text}`;
  if (cls) line.className = cls;
  box.prepend(line);
  while (box.childElementCount > 30) box.lastElementChild.remove();
}

const clock = (ms) => new Date(ms).toTimeString().slice(0, 8);
const setText = (el, text) => {
  if (el.textContent !== text) el.textContent = text;
};

function makeRows(container, n) {
  const rows = [];
  for (let i = 0; i < n; i++) {
    const row = document.createElement("div");
    row.className = "ladder-row empty";
    row.innerHTML = '<span class="bar"></span><span class="price"></span><span class="size"></span><span class="total"></span>';
    row.addEventListener("click", () => {
      if (row.dataset.price) {
        $("price").value = row.dataset.price;
        updateTicket();
      }
    });
    container.append(row);
    rows.push({ row, bar: row.children[0], price: row.children[1], size: row.children[2], total: row.children[3] });
  }
  return rows;
}

let askRows = [];
let bidRows = [];

function renderBook() {
  const { pdec, qdec } = state.inst;
  const { bids, asks } = state.book.levels();
  const mine = { buy: new Set(), sell: new Set() };
  for (const o of state.orders.values()) {
    if (isOpen(o) && o.symbol === state.symbol && o.price) mine[o.side].add(o.price);
  }
  const fill = (rows, levels, ownSide, reversed) => {
    const totals = [];
    let sum = 0n;
    for (let i = 0; i < rows.length && i < levels.length; i++) {
      sum += toUnits(levels[i].q, qdec);
      totals.push(sum);
    }
    return { totals, paint: (max) => {
      for (let i = 0; i < rows.length; i++) {
        const r = rows[reversed ? rows.length - 1 - i : i];
        const level = levels[i];
        if (!level) {
          r.row.className = "ladder-row empty";
          r.row.dataset.price = "";
          setText(r.price, "");
          setText(r.size, "");
          setText(r.total, "");
          r.bar.style.width = "0";
          continue;
        }
        r.row.className = `ladder-row${mine[ownSide].has(level.p) ? " mine" : ""}`;
        r.row.dataset.price = level.p;
        setText(r.price, level.p);
        setText(r.size, level.q);
        setText(r.total, trim(fromUnits(totals[i], qdec), 2));
        r.bar.style.width = `${max > 0n ? Number((totals[i] * 1000n) / max) / 10 : 0}%`;
      }
    } };
  };
  const a = fill(askRows, asks, "sell", true);
  const b = fill(bidRows, bids, "buy", false);
  const maxA = a.totals.at(-1) || 0n;
  const maxB = b.totals.at(-1) || 0n;
  const max = maxA > maxB ? maxA : maxB;
  a.paint(max);
  b.paint(max);

  const bestBid = bids[0];
  const bestAsk = asks[0];
  setText($("best-bid"), bestBid ? bestBid.p : "—");
  setText($("best-ask"), bestAsk ? bestAsk.p : "—");
  setText($("spread"), bestBid && bestAsk ? fromUnits(bestAsk.u - bestBid.u, pdec) : "—");
  setText($("book-seq"), state.book.ready ? `seq ${state.book.seq}` : "syncing…");
  const mid = $("mid");
  if (state.last) {
    setText(mid, `${state.last.price} ${state.last.up ? "▲" : "▼"}`);
    mid.className = `mid ${state.last.up ? "up" : "down"}`;
    setText($("last"), state.last.price);
  } else {
    setText(mid, bestBid && bestAsk ? `spread ${fromUnits(bestAsk.u - bestBid.u, pdec)}` : "—");
  }
  drawDepth(bids, asks);
}

function canvasContext(canvas) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px ui-monospace, DejaVu Sans Mono, monospace";
  return { ctx, w, h };
}

const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

function drawDepth(bids, asks) {
  const { ctx, w, h } = canvasContext($("depth"));
  const { pdec, qdec } = state.inst;
  const side = (levels) => {
    const pts = [];
    let sum = 0n;
    for (const l of levels.slice(0, DEPTH_LEVELS)) {
      sum += toUnits(l.q, qdec);
      pts.push([asNumber(l.u, pdec), asNumber(sum, qdec)]);
    }
    return pts;
  };
  const b = side(bids);
  const a = side(asks);
  if (!b.length && !a.length) {
    ctx.fillStyle = css("--muted");
    ctx.fillText("empty book", 8, 16);
    return;
  }
  const prices = [...b, ...a].map((p) => p[0]);
  let lo = Math.min(...prices);
  let hi = Math.max(...prices);
  if (hi === lo) [lo, hi] = [lo * 0.999, hi * 1.001 || 1];
  const top = Math.max(...[...b, ...a].map((p) => p[1])) * 1.1;
  const pad = 18;
  const x = (p) => ((p - lo) / (hi - lo)) * (w - 8) + 4;
  const y = (q) => h - pad - (q / top) * (h - pad - 6);
  const area = (pts, color, fillColor, leftward) => {
    if (!pts.length) return;
    ctx.beginPath();
    ctx.moveTo(x(pts[0][0]), y(0));
    let prevQ = 0;
    for (const [p, q] of pts) {
      ctx.lineTo(x(p), y(prevQ));
      ctx.lineTo(x(p), y(q));
      prevQ = q;
    }
    ctx.lineTo(leftward ? 4 : w - 4, y(prevQ));
    ctx.strokeStyle = color;
    ctx.lineWidth = 1.5;
    ctx.stroke();
    ctx.lineTo(leftward ? 4 : w - 4, y(0));
    ctx.closePath();
    ctx.fillStyle = fillColor;
    ctx.fill();
  };
  area(b, css("--buy"), css("--buy-dim"), true);
  area(a, css("--sell"), css("--sell-dim"), false);
  if (b.length && a.length) {
    const mid = (b[0][0] + a[0][0]) / 2;
    ctx.setLineDash([3, 3]);
    ctx.strokeStyle = css("--muted");
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(Math.round(x(mid)) + 0.5, 4);
    ctx.lineTo(Math.round(x(mid)) + 0.5, h - pad);
    ctx.stroke();
    ctx.setLineDash([]);
    const label = `mid ${mid.toFixed(pdec)}`;
    ctx.fillStyle = css("--text");
    ctx.fillText(label, Math.min(Math.max(4, x(mid) - ctx.measureText(label).width / 2), w - 4 - ctx.measureText(label).width), 14);
  }
  ctx.fillStyle = css("--muted");
  ctx.textBaseline = "alphabetic";
  ctx.fillText(lo.toFixed(pdec), 4, h - 4);
  const right = hi.toFixed(pdec);
  ctx.fillText(right, w - 4 - ctx.measureText(right).width, h - 4);
}

function drawCandles() {
  const { ctx, w, h } = canvasContext($("candles"));
  const { pdec, qdec } = state.inst;
  const axis = 78;
  const slot = 12;
  const fit = Math.max(1, Math.floor((w - axis - 8) / slot));
  const times = [...state.candles.keys()].sort((p, q) => p - q);
  const lastT = times.length ? times.at(-1) : Math.floor(Date.now() / CANDLE_MS) * CANDLE_MS;
  const shown = times.filter((t) => lastT - t < fit * CANDLE_MS).map((t) => state.candles.get(t));
  ctx.strokeStyle = css("--line");
  ctx.lineWidth = 1;
  for (let i = 1; i < 5; i++) {
    const gy = Math.round((h * i) / 5) + 0.5;
    ctx.beginPath();
    ctx.moveTo(0, gy);
    ctx.lineTo(w - axis, gy);
    ctx.stroke();
  }
  if (!shown.length) {
    ctx.fillStyle = css("--muted");
    ctx.fillText("waiting for the first trade", 12, 20);
    return;
  }
  let lo = Math.min(...shown.map((c) => asNumber(c.lu, pdec)));
  let hi = Math.max(...shown.map((c) => asNumber(c.hu, pdec)));
  const span = hi - lo || Math.max(hi * 0.002, 10 ** -pdec * 10);
  lo -= span * 0.15;
  hi += span * 0.15;
  const volH = h * 0.18;
  const priceH = h - volH - 20;
  const y = (p) => 8 + ((hi - p) / (hi - lo)) * (priceH - 8);
  const maxVol = Math.max(...shown.map((c) => asNumber(c.volume, qdec))) || 1;
  const xOf = (t) => w - axis - 8 - ((lastT - t) / CANDLE_MS) * slot - slot / 2;
  for (const c of shown) {
    const up = c.cu >= c.ou;
    const color = up ? css("--buy") : css("--sell");
    const cx = Math.round(xOf(c.t)) + 0.5;
    ctx.strokeStyle = color;
    ctx.fillStyle = color;
    ctx.beginPath();
    ctx.moveTo(cx, y(asNumber(c.hu, pdec)));
    ctx.lineTo(cx, y(asNumber(c.lu, pdec)));
    ctx.stroke();
    const top = y(asNumber(up ? c.cu : c.ou, pdec));
    const bottom = y(asNumber(up ? c.ou : c.cu, pdec));
    ctx.fillRect(cx - slot * 0.35, top, slot * 0.7, Math.max(1.5, bottom - top));
    ctx.globalAlpha = 0.35;
    const vh = (asNumber(c.volume, qdec) / maxVol) * (volH - 4);
    ctx.fillRect(cx - slot * 0.35, h - 20 - vh, slot * 0.7, vh);
    ctx.globalAlpha = 1;
  }
  ctx.fillStyle = css("--muted");
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const p = lo + ((hi - lo) * i) / 4;
    ctx.fillText(p.toFixed(pdec), w - axis + 6, y(p));
  }
  ctx.textBaseline = "alphabetic";
  for (let t = lastT; lastT - t < fit * CANDLE_MS; t -= 10 * CANDLE_MS) {
    ctx.fillText(clock(t).slice(0, 5), xOf(t) - 15, h - 4);
  }
  const last = state.candles.get(lastT);
  ctx.setLineDash([3, 3]);
  ctx.strokeStyle = css("--accent");
  const ly = Math.round(y(asNumber(last.cu, pdec))) + 0.5;
  ctx.beginPath();
  ctx.moveTo(0, ly);
  ctx.lineTo(w - axis, ly);
  ctx.stroke();
  ctx.setLineDash([]);
  ctx.fillStyle = css("--accent");
  ctx.fillRect(w - axis + 2, ly - 8, axis - 4, 16);
  ctx.fillStyle = "#111";
  ctx.textBaseline = "middle";
  ctx.fillText(last.close, w - axis + 6, ly);
  const info = $("candle-info");
  setText(info, `${clock(last.t).slice(0, 5)}  O ${last.open}  H ${last.high}  L ${last.low}  C ${last.close}  V ${trim(fromUnits(last.volume, qdec), 2)}  (${last.trades} trade${last.trades === 1 ? "" : "s"})`);
}

function renderTape() {
  const box = $("tape");
  const frag = document.createDocumentFragment();
  for (const t of state.pendingTape) {
    const row = document.createElement("div");
    row.className = `tape-row fresh ${t.aggressor_side}`;
    row.dataset.tradeId = String(t.trade_id);
    for (const [cls, text] of [["price", t.price], ["size", t.quantity], ["time", clock(t.ts)]]) {
      const span = document.createElement("span");
      span.className = cls;
      span.textContent = text;
      row.append(span);
    }
    frag.prepend(row);
  }
  state.pendingTape = [];
  box.prepend(frag);
  while (box.childElementCount > TAPE_ROWS) box.lastElementChild.remove();
}

function renderOrders() {
  const body = $("open-orders");
  const rows = openOrders();
  body.replaceChildren(
    ...rows.map((o) => {
      const tr = document.createElement("tr");
      tr.dataset.orderId = o.order_id;
      const cells = [
        [clock(o.ts), ""],
        [o.symbol, ""],
        [o.side, o.side],
        [o.price ?? "market", "num"],
        [o.quantity, "num"],
        [o.filled_quantity, "num"],
        [o.status.replace("_", " "), ""],
        [o.client_order_id ?? "", ""],
      ];
      for (const [text, cls] of cells) {
        const td = document.createElement("td");
        td.textContent = text;
        if (cls) td.className = cls;
        tr.append(td);
      }
      const td = document.createElement("td");
      const btn = document.createElement("button");
      btn.className = "cancel";
      btn.textContent = "Cancel";
      btn.dataset.orderId = o.order_id;
      btn.dataset.symbol = o.symbol;
      td.append(btn);
      tr.append(td);
      return tr;
    }),
  );
  $("no-orders").style.display = rows.length ? "none" : "";
  setText($("orders-count"), state.account ? `${state.account} · ${rows.length}` : "");
}

function renderBalances() {
  const shown = state.authed && !state.balancesOff && state.balances.size > 0;
  $("balances-table").hidden = !shown;
  const why = !state.account
    ? "connect an account to see its balances"
    : state.balancesOff
      ? "this venue keeps no balances (it runs with --risk off)"
      : !state.authed
        ? "connecting…"
        : "no balances yet";
  $("balances-note").hidden = shown;
  setText($("balances-note"), why);
  $("balances-panel").classList.toggle("off", state.balancesOff);
  const [base, quote] = state.symbol.split("-");
  const assets = [...state.balances.keys()].sort();
  $("balances").replaceChildren(
    ...assets.map((asset) => {
      const { available, held } = state.balances.get(asset);
      const tr = document.createElement("tr");
      tr.dataset.asset = asset;
      if (asset === base || asset === quote) tr.className = "traded";
      for (const [text, cls] of [[asset, ""], [available, "num"], [held, "num"]]) {
        const td = document.createElement("td");
        td.textContent = text;
        if (cls) td.className = cls;
        tr.append(td);
      }
      return tr;
    }),
  );
}

function frame() {
  stats.frames++;
  if (dirty.book || dirty.tape || dirty.candles || dirty.orders || dirty.balances) {
    stats.renders++;
    const started = performance.now();
    if (dirty.orders) renderOrders();
    if (dirty.balances) renderBalances();
    if (dirty.book && state.book) renderBook();
    if (dirty.tape) renderTape();
    if (dirty.candles) drawCandles();
    dirty.book = dirty.tape = dirty.candles = dirty.orders = dirty.balances = false;
    stats.maxRenderMs = Math.max(stats.maxRenderMs, performance.now() - started);
  }
  requestAnimationFrame(frame);
}

// --- ticket ---------------------------------------------------------------------------------------

function updateTicket() {
  const type = $("type").value;
  const tif = $("tif");
  const market = type === "market" || type === "stop_market"; // no price
  tif.options[0].disabled = market; // a market order is IOC or FOK
  tif.options[2].disabled = type === "stop_market"; // a stop market is IOC only
  if (market && tif.value === "gtc") tif.value = "ioc";
  if (type === "stop_market") tif.value = "ioc";
  $("price").disabled = market;
  $("stop-row").hidden = !type.startsWith("stop_");
  const postOnly = $("post-only");
  postOnly.disabled = type !== "limit" || tif.value !== "gtc";
  if (postOnly.disabled) postOnly.checked = false;
  const submit = $("submit");
  submit.className = `submit ${state.side}`;
  submit.disabled = !state.authed;
  submit.textContent = state.authed ? `${state.side === "buy" ? "Buy" : "Sell"} ${state.symbol.split("-")[0]}` : "Connect an account first";
  $("side-buy").classList.toggle("active", state.side === "buy");
  $("side-sell").classList.toggle("active", state.side === "sell");
  const who = $("who");
  who.textContent = state.authed ? `trading as ${state.account}` : state.account ? `connecting as ${state.account}…` : "not connected";
  who.className = `who${state.authed ? " up" : ""}`;
  const { pdec, qdec } = state.inst;
  const p = toUnits($("price").value, pdec);
  const q = toUnits($("qty").value, qdec);
  const quote = state.symbol.split("-")[1] || "";
  $("notional").textContent = !market && p !== null && q !== null ? `${trim(fromUnits(p * q, pdec + qdec), pdec)} ${quote}` : "—";
}

// --- latency --------------------------------------------------------------------------------------

function micros(us) {
  if (us === null || us === undefined) return "—";
  if (us < 1000) return `${us.toFixed(us < 10 ? 1 : 0)} µs`;
  return `${(us / 1000).toFixed(us < 10_000 ? 2 : 1)} ms`;
}

async function pollLatency() {
  try {
    const resp = await fetch("/api/latency", { cache: "no-store" });
    const data = await resp.json();
    $("latency").replaceChildren(
      ...data.stages.map((s) => {
        const tr = document.createElement("tr");
        tr.dataset.stage = s.stage;
        tr.title = `${s.detail} (${s.scope === "recent" ? "recent" : "since start"})`;
        for (const text of [s.label, micros(s.p50_us), micros(s.p99_us), String(s.count)]) {
          const td = document.createElement("td");
          td.textContent = text;
          tr.append(td);
        }
        return tr;
      }),
    );
    const down = data.sources.filter((s) => !s.ok).length;
    setText(
      $("latency-scope"),
      `${data.window_seconds ? `last ${Math.round(data.window_seconds)} s` : "since start"}${down ? ` · ${down} source${down > 1 ? "s" : ""} down` : ""}`,
    );
  } catch {
    setText($("latency-scope"), "unavailable");
  }
}

// --- start ----------------------------------------------------------------------------------------

function selectSymbol(symbol) {
  if (md && state.symbol) {
    md.send({ op: "unsubscribe", symbol: state.symbol, channel: "l2" });
    tradesFeed.send({ op: "unsubscribe", symbol: state.symbol });
  }
  const spec = state.config.symbols.find((s) => s.symbol === symbol);
  state.symbol = symbol;
  state.inst = { spec, pdec: decimalsOf(spec.tick_size), qdec: decimalsOf(spec.lot_size) };
  state.book = new Book(state.inst.pdec);
  state.trades = [];
  state.pendingTape = [];
  state.tradeIds = new Set();
  state.candles = new Map();
  state.last = null;
  $("tape").replaceChildren();
  $("price").placeholder = fromUnits(0n, state.inst.pdec);
  $("qty").placeholder = fromUnits(0n, state.inst.qdec);
  setText($("last"), "—");
  setText($("candle-info"), "no trades yet");
  const params = new URLSearchParams(location.search);
  params.set("symbol", symbol);
  history.replaceState(null, "", `?${params}`);
  if (md) {
    md.send({ op: "subscribe", symbol, channel: "l2" });
    tradesFeed.send({ op: "subscribe", symbol });
  }
  updateTicket();
  invalidate("book", "tape", "candles", "orders", "balances");
}

async function main() {
  state.config = await (await fetch("/api/config", { cache: "no-store" })).json();
  const params = new URLSearchParams(location.search);
  const select = $("symbol");
  for (const s of state.config.symbols) select.append(new Option(s.symbol, s.symbol));
  const wanted = params.get("symbol");
  select.value = state.config.symbols.some((s) => s.symbol === wanted) ? wanted : state.config.symbols[0].symbol;
  askRows = makeRows($("asks"), LADDER_ROWS);
  bidRows = makeRows($("bids"), LADDER_ROWS);
  selectSymbol(select.value);

  md = new Socket("md", state.config.md, () => {
    state.book.ready = false;
    md.send({ op: "subscribe", symbol: state.symbol, channel: "l2" });
  }, onMd);
  tradesFeed = new Socket("trades", state.config.trades, () => tradesFeed.send({ op: "subscribe", symbol: state.symbol }), onTrade);

  select.addEventListener("change", () => selectSymbol(select.value));
  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const name = $("account").value.trim();
    if (name) connectAccount(name);
  });
  $("account").placeholder = state.config.auth === "api_key" ? "API key" : "account name";
  $("order-form").addEventListener("submit", submitOrder);
  $("side-buy").addEventListener("click", () => ((state.side = "buy"), updateTicket()));
  $("side-sell").addEventListener("click", () => ((state.side = "sell"), updateTicket()));
  for (const id of ["type", "tif", "price", "qty"]) {
    $(id).addEventListener("input", updateTicket);
    $(id).addEventListener("change", updateTicket);
  }
  $("open-orders").addEventListener("click", (ev) => {
    const btn = ev.target.closest("button.cancel");
    if (btn) cancelOrder(btn.dataset.symbol, btn.dataset.orderId);
  });
  window.addEventListener("resize", () => invalidate("book", "candles"));

  // Open mode: the account name is remembered, so a reload reconnects and rebuilds the open orders.
  const account = params.get("account") || (state.config.auth === "open" ? localStorage.getItem("cme.account") : null);
  if (account) {
    $("account").value = account;
    connectAccount(account);
  }
  pollLatency();
  setInterval(pollLatency, LATENCY_EVERY_MS);
  requestAnimationFrame(frame);
}

// For tests and the curious: counters, and the model as plain data.
window.__cme = {
  stats,
  state,
  book: () => {
    if (!state.book) return null;
    const { bids, asks } = state.book.levels();
    return { symbol: state.symbol, seq: state.book.seq, ready: state.book.ready, bids: bids.map((l) => [l.p, l.q]), asks: asks.map((l) => [l.p, l.q]) };
  },
  openOrders: () => openOrders().map((o) => ({ order_id: o.order_id, symbol: o.symbol, side: o.side, price: o.price, quantity: o.quantity, status: o.status })),
  candles: () => [...state.candles.values()].sort((a, b) => a.t - b.t).map((c) => ({ t: c.t, open: c.open, high: c.high, low: c.low, close: c.close, volume: fromUnits(c.volume, state.inst.qdec), trades: c.trades })),
  trades: () => state.trades.map((t) => ({ trade_id: t.trade_id, price: t.price, quantity: t.quantity, side: t.aggressor_side, ts: t.ts })),
  authed: () => state.authed,
  ordersSynced: () => state.ordersSynced,
  balances: () => (state.balancesOff ? null : Object.fromEntries(state.balances)),
};

main().catch((err) => {
  const banner = document.createElement("div");
  banner.className = "fatal";
  banner.textContent = `The page could not start: ${err}`;
  document.body.prepend(banner);
  console.error(err);
});
