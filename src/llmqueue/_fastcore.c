/* The simulator's compiled event loop (docs/architecture.md, docs/performance.md; paper §3.1).
 *
 * The same batches as Engine.step driven by the reference loop of simulator.simulate, bit for
 * bit, for every scheduler defined as a plan (llmqueue.schedulers.plan) with a tokens-only
 * batch-time model.  The policy is not written here: run() receives the plan's encoding and
 * plan_batch() interprets its steps (Decodes, Prefills, Running, Waiting, and the max-weight
 * load rule) exactly as plan.interpret does on Request objects.  Batch ends are added one at a
 * time (end = now + t_b) as in the reference, so every float matches to the last bit.
 *
 * Requests are indices (rid = arrival order).  Plans are counts: a batch gives one decode token
 * to the n leading decoders (every plan step serves a prefix of them) plus prefill chunks of the
 * leading prefilling requests.  Lazy decode counts: the leading "head" decoders store the round
 * at which they finish (decode_left = round), so a batch that decodes exactly them adds one to
 * `rounds`; a calendar of (round, rid) entries says who finishes at each round.  Entries are
 * checked when their round comes (an entry whose request has moved is skipped or re-filed), so a
 * decoder that misses a round costs one integer add.  Decoders behind the head keep -(tokens left).
 * The calendar is a ring of W per-round lists (W > the longest output, up to `ring`) with a heap
 * for entries further ahead: `rounds` advances one at a time, so each list is taken exactly at
 * its round, in O(1).
 *
 * Python calls run() once per simulation, or once per chunk of a streamed run, which resumes
 * with the requests still in the engine (fastcore.py prepares the arrays and rebuilds the
 * engine's state from what it returns).  Ctrl-C is honoured every 65,536 batches.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Plan steps and load rules: the codes of llmqueue.schedulers.plan (Plan.encode). */
enum { DECODES = 1, PREFILLS = 2, RUNNING = 3, WAITING = 4 };
enum { NO_LOAD_RULE = 0, MAX_WEIGHT_LOAD = 1 };
#define MAX_STEPS 8

typedef struct { int64_t code, exclusive, split, max_chunk, max_running; } PlanStep;

#ifndef LLMQUEUE_FASTCORE_SHA256
#define LLMQUEUE_FASTCORE_SHA256 "unknown"
#endif

#define NO_CAP ((int64_t)1 << 62)
#define MIN(a, b) ((a) < (b) ? (a) : (b))

typedef struct { int64_t key, rid; } Entry;

/* ---- growable buffers and the round heap --------------------------------------------- */

/* A growable buffer: malloc'd, or (python set) a bytearray handed to Python at the end, so the
 * per-batch arrays come back without a copy. */
typedef struct { char *data; size_t size, cap; int python; PyObject *array; } Buf;

static int buf_reserve(Buf *b, size_t more) {
    if (b->size + more <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 1 << 16;
    while (cap < b->size + more) cap *= 2;
    if (b->python) {
        if (!b->array) {
            b->array = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)cap);
            if (!b->array) return -1;
        } else if (PyByteArray_Resize(b->array, (Py_ssize_t)cap) < 0) {
            return -1;
        }
        b->data = PyByteArray_AS_STRING(b->array);
    } else {
        char *p = realloc(b->data, cap);
        if (!p) { PyErr_NoMemory(); return -1; }
        b->data = p;
    }
    b->cap = cap;
    return 0;
}

/* The bytearray of a python buffer, cut to its size (a new reference; the buffer lets go). */
static PyObject *buf_take(Buf *b) {
    PyObject *array = b->array ? b->array : PyByteArray_FromStringAndSize(NULL, 0);
    b->array = NULL;
    if (array && PyByteArray_Resize(array, (Py_ssize_t)b->size) < 0) Py_CLEAR(array);
    return array;
}

static void buf_free(Buf *b) {
    if (b->python) Py_XDECREF(b->array); else free(b->data);
}

typedef struct { Entry *a; Py_ssize_t n, cap; } Heap;

static int heap_push(Heap *h, int64_t key, int64_t rid) {
    if (h->n == h->cap) {
        Py_ssize_t cap = h->cap ? 2 * h->cap : 1024;
        Entry *p = realloc(h->a, (size_t)cap * sizeof(Entry));
        if (!p) { PyErr_NoMemory(); return -1; }
        h->a = p;
        h->cap = cap;
    }
    Py_ssize_t j = h->n++;
    while (j > 0) {
        Py_ssize_t up = (j - 1) / 2;
        if (h->a[up].key <= key) break;
        h->a[j] = h->a[up];
        j = up;
    }
    h->a[j].key = key;
    h->a[j].rid = rid;
    return 0;
}

static Entry heap_pop(Heap *h) {
    Entry top = h->a[0], last = h->a[--h->n];
    Py_ssize_t j = 0, n = h->n;
    for (;;) {
        Py_ssize_t c = 2 * j + 1;
        if (c >= n) break;
        if (c + 1 < n && h->a[c + 1].key < h->a[c].key) c++;
        if (last.key <= h->a[c].key) break;
        h->a[j] = h->a[c];
        j = c;
    }
    if (n) h->a[j] = last;
    return top;
}

/* The calendar: slot[key & mask] lists the entries due at round `key` (nodes, -1 ends a list);
 * entries mask + 1 or more rounds ahead wait in `far`. */
typedef struct {
    int64_t *slot, *node_rid, *node_next;
    int64_t nodes, node_cap, free, mask;
    Heap far;
} Calendar;

static int cal_init(Calendar *c, int64_t longest, int64_t ring) {
    int64_t w = 16;
    while (w < longest + 2 && w < ring) w *= 2;
    c->mask = w - 1;
    c->free = -1;
    c->slot = malloc((size_t)w * sizeof(int64_t));
    if (!c->slot) { PyErr_NoMemory(); return -1; }
    memset(c->slot, 0xff, (size_t)w * sizeof(int64_t));  /* every slot -1: empty */
    return 0;
}

static int cal_push(Calendar *c, int64_t rounds, int64_t key, int64_t rid) {
    if (key - rounds > c->mask) return heap_push(&c->far, key, rid);
    int64_t k = c->free;
    if (k >= 0) {
        c->free = c->node_next[k];
    } else {
        if (c->nodes == c->node_cap) {
            int64_t cap = c->node_cap ? 2 * c->node_cap : 4096;
            int64_t *r = realloc(c->node_rid, (size_t)cap * sizeof(int64_t));
            if (!r) { PyErr_NoMemory(); return -1; }
            c->node_rid = r;
            int64_t *n = realloc(c->node_next, (size_t)cap * sizeof(int64_t));
            if (!n) { PyErr_NoMemory(); return -1; }
            c->node_next = n;
            c->node_cap = cap;
        }
        k = c->nodes++;
    }
    int64_t *head = &c->slot[key & c->mask];
    c->node_rid[k] = rid;
    c->node_next[k] = *head;
    *head = k;
    return 0;
}

/* Move the entries due at round `rounds` to fin (a buffer of rids); return their count or -1. */
static Py_ssize_t cal_take(Calendar *c, int64_t rounds, Buf *fin) {
    Py_ssize_t count = 0;
    int64_t *head = &c->slot[rounds & c->mask];
    for (int64_t k = *head, next; k >= 0; k = next) {
        if (buf_reserve(fin, (size_t)(count + 1) * sizeof(int64_t))) return -1;
        ((int64_t *)fin->data)[count++] = c->node_rid[k];
        next = c->node_next[k];
        c->node_next[k] = c->free;
        c->free = k;
    }
    *head = -1;
    while (c->far.n && c->far.a[0].key <= rounds) {
        if (buf_reserve(fin, (size_t)(count + 1) * sizeof(int64_t))) return -1;
        ((int64_t *)fin->data)[count++] = heap_pop(&c->far).rid;
    }
    return count;
}

/* First index in sorted a[lo:hi] whose value is >= x (branch-free halving: the finished
 * request's position is unpredictable, and mispredicted branches cost more than the loads). */
static Py_ssize_t bisect_left(const int64_t *a, int64_t x, Py_ssize_t lo, Py_ssize_t hi) {
    if (lo >= hi) return lo;
    const int64_t *base = a + lo;
    Py_ssize_t len = hi - lo;
    while (len > 1) {
        Py_ssize_t half = len >> 1;
        base += base[half - 1] < x ? half : 0;
        len -= half;
    }
    return (Py_ssize_t)(base - a) + (*base < x);
}

/* One round later for the decoders at dq[lo:hi] (restrict: the two arrays never overlap, so the
 * loads of dq need not wait for the stores to dl). */
static inline void delay(int64_t *restrict dl, const int64_t *restrict dq, Py_ssize_t lo, Py_ssize_t hi) {
    for (Py_ssize_t j = lo; j < hi; j++) dl[dq[j]] += 1;
}

static int cmp_desc(const void *x, const void *y) {
    int64_t a = *(const int64_t *)x, b = *(const int64_t *)y;
    return (a < b) - (a > b);
}

/* ---- the loop -------------------------------------------------------------------------- */

typedef struct {
    /* inputs */
    const double *arrivals; const int64_t *prompts, *outputs; const double *durations;
    Py_ssize_t n_arr;
    int splits_prompts, record;
    int64_t budget, cap;
    /* the policy: its plan steps and load rule (max-weight: candidate loads, see maxweight.py) */
    PlanStep steps[MAX_STEPS];
    int nsteps, load_rule;
    const int64_t *useful, *breaks;   /* useful == NULL: every load is useful */
    Py_ssize_t n_useful, n_breaks;
    double horizon, start_now;
    PyObject *progress;
    /* a resumed run (streaming): requests [0, carried) are already in the engine, their queues
     * given in prefilling[0:n_pre] and decoding[0:n_dec]; stop: return once every arrival is in */
    Py_ssize_t carried, n_pre, n_dec;
    int stop;
    /* per-request state (indexed by rid) and queues, owned by the caller */
    int64_t *pl, *dl;           /* prefill_left, decode_left (lazy for decoders) */
    double *first, *finish;
    int64_t *pq, *dq, *rej;     /* prefilling queue pq[ps:pe], decoding list buffer, rejected */
    /* scratch */
    int64_t *chunk_rid, *chunk_len, *tmp;
    Calendar cal;
    Buf fin, ends, tokens, detail;
} Loop;

typedef struct {
    double now;
    Py_ssize_t i, ps, pe, ds, nd, nrej;
    int64_t in_engine, violations, total_prefill;
    size_t turns;  /* planned batches (the rest ran as decode-only rounds) */
} Out;

/* The room and request slots left while a batch is planned, and its pieces so far. */
typedef struct { int64_t room, slots, n; Py_ssize_t nch; } Build;

/* Prefill chunks of pq[from:pe] in order (plan.Prefills; BatchBuilder.add_prefill): each the whole
 * prompt left, at most max_chunk, cut to the room when split (else it and those behind it wait). */
static void prefills(Loop *L, Build *b, Py_ssize_t from, Py_ssize_t pe, int split, int64_t max_chunk) {
    for (Py_ssize_t q = from; q < pe; q++) {
        if (b->room == 0 || b->slots == 0) break;
        int64_t r = L->pq[q], want = MIN(L->pl[r], max_chunk), c = MIN(want, b->room);
        if (c < want && !split) break;
        L->chunk_rid[b->nch] = r;
        L->chunk_len[b->nch++] = c;
        b->room -= c;
        b->slots -= 1;
    }
}

/* The next k leading decoders get a token (BatchBuilder.add_decodes). */
static inline void decodes(Build *b, int64_t k) {
    k = MIN(MIN(k, b->room), b->slots);
    if (k > 0) { b->n += k; b->room -= k; b->slots -= k; }
}

/* How many prompts at the front of pq[ps:pe] are partly prefilled (vLLM v1's running prompts). */
static Py_ssize_t started(Loop *L, Py_ssize_t ps, Py_ssize_t pe) {
    Py_ssize_t q = ps;
    while (q < pe && L->pl[L->pq[q]] != L->prompts[L->pq[q]]) q++;
    return q - ps;
}

/* plan.Running: decoders and started prompts interleaved in admission order (rid). */
static void running(Loop *L, Build *b, Py_ssize_t ps, Py_ssize_t pe, const int64_t *dq, Py_ssize_t nd,
                    int64_t max_chunk) {
    Py_ssize_t prev = 0, count = started(L, ps, pe);
    for (Py_ssize_t q = ps; q < ps + count; q++) {
        int64_t r = L->pq[q];
        Py_ssize_t pos = bisect_left(dq, r, prev, nd);
        decodes(b, (int64_t)(pos - prev));
        if (b->room && b->slots) {
            int64_t c = MIN(MIN(L->pl[r], max_chunk), b->room);
            L->chunk_rid[b->nch] = r;
            L->chunk_len[b->nch++] = c;
            b->room -= c;
            b->slots -= 1;
        }
        prev = pos;
    }
    decodes(b, (int64_t)(nd - prev));
}

/* plan.Waiting: new prompts FCFS while fewer than max_running requests run. */
static void waiting(Loop *L, Build *b, Py_ssize_t ps, Py_ssize_t pe, Py_ssize_t nd, int64_t max_chunk,
                    int64_t max_running) {
    Py_ssize_t count = started(L, ps, pe);
    int64_t run = (int64_t)count + (int64_t)nd;
    for (Py_ssize_t q = ps + count; q < pe; q++) {
        if (b->room == 0 || b->slots == 0 || run >= max_running) break;
        int64_t r = L->pq[q], c = MIN(MIN(L->pl[r], max_chunk), b->room);
        L->chunk_rid[b->nch] = r;
        L->chunk_len[b->nch++] = c;
        b->room -= c;
        b->slots -= 1;
        run++;
    }
}

static inline void consider(Loop *L, int64_t b, int64_t y, int64_t P, int64_t D, double *best, int64_t *load,
                            int64_t *dec) {
    double score = (double)(P * (b - y) + D * y) / L->durations[b];
    if (score > *best || (score == *best && b > *load)) { *best = score; *load = b; *dec = y; }
}

/* MaxWeightLoad.choose (schedulers/maxweight.py): the load and decode count maximising
 * (P x + D y) / t_b over the candidate loads of each shape.  P: prefill tokens left, D: decode
 * tokens left of the decoders. */
static void max_weight(Loop *L, Py_ssize_t ps, Py_ssize_t pe, Py_ssize_t nd, int64_t P, int64_t D, int64_t *load,
                       int64_t *dec) {
    int64_t budget = L->budget, k = L->cap < NO_CAP ? L->cap : budget;
    if (!P || !nd) D = 0;
    int64_t y_all = MIN(MIN((int64_t)nd, k), budget), shapes[2] = {y_all, k - 1};
    int nshapes = (P && y_all == k) ? 2 : 1;
    double best = -1.0;
    *load = 0;
    *dec = 0;
    for (int s = 0; s < nshapes; s++) {
        int64_t y = shapes[s], slots = k - y, room = budget - y, x_cap = 0;
        if (P && slots && room) {
            if (slots >= room) {
                x_cap = MIN(room, P);
            } else {
                for (Py_ssize_t q = ps; q < pe && q < ps + slots; q++) {
                    x_cap += L->pl[L->pq[q]];
                    if (x_cap >= room) break;
                }
                x_cap = MIN(x_cap, room);
            }
        }
        int64_t lo = y > 1 ? y : 1, hi = y + x_cap;
        if (hi < lo) continue;
        consider(L, lo, y, P, D, &best, load, dec);
        consider(L, hi, y, P, D, &best, load, dec);
        for (Py_ssize_t j = bisect_left(L->breaks, lo, 0, L->n_breaks); j < L->n_breaks && L->breaks[j] <= hi; j++)
            consider(L, L->breaks[j], y, P, D, &best, load, dec);
        if (L->useful) {
            Py_ssize_t j = bisect_left(L->useful, lo, 0, L->n_useful);
            if (j < L->n_useful && L->useful[j] <= hi) consider(L, L->useful[j], y, P, D, &best, load, dec);
            j = bisect_left(L->useful, hi + 1, 0, L->n_useful) - 1;
            if (j >= 0 && L->useful[j] >= lo) consider(L, L->useful[j], y, P, D, &best, load, dec);
        }
    }
}

/* plan.interpret as counts: the n leading decoders get a token (every step serves a prefix of the
 * decoding list), plus the chunks in chunk_rid/chunk_len.  Returns the prefill tokens. */
static int64_t plan_batch(Loop *L, Py_ssize_t ps, Py_ssize_t pe, const int64_t *dq, Py_ssize_t nd, int64_t P,
                          int64_t D, int64_t *n_out, Py_ssize_t *nch) {
    Build b = {L->budget, L->cap, 0, 0};
    int64_t most_decodes = NO_CAP;
    if (L->load_rule == MAX_WEIGHT_LOAD) max_weight(L, ps, pe, nd, P, D, &b.room, &most_decodes);
    int64_t load = b.room;
    for (int k = 0; k < L->nsteps && b.room && b.slots; k++) {
        const PlanStep *s = &L->steps[k];
        int stop = 0;
        switch (s->code) {
        case DECODES:
            stop = s->exclusive && nd;
            decodes(&b, stop ? (int64_t)nd : MIN((int64_t)nd, most_decodes));
            break;
        case PREFILLS:
            stop = s->exclusive && ps < pe;
            prefills(L, &b, ps, pe, (int)s->split, s->max_chunk);
            break;
        case RUNNING:
            running(L, &b, ps, pe, dq, nd, s->max_chunk);
            break;
        default:
            waiting(L, &b, ps, pe, nd, s->max_chunk, s->max_running);
        }
        if (stop) break;
    }
    *n_out = b.n;
    *nch = b.nch;
    return load - b.room - b.n;
}

/* Settle fin[0:nfin], the calendar's candidates at round `rounds`: finish those due (they leave
 * the decoding list dq[:nd], whose head they are in), re-file delayed ones at their true round,
 * skip stale ones.  Returns how many finished, or -1. */
static inline Py_ssize_t settle(Loop *L, Py_ssize_t nfin, int64_t rounds, double end, int64_t **dqp,
                                Py_ssize_t *nd, Py_ssize_t *head) {
    int64_t *dl = L->dl, *dq = *dqp;
    const int64_t *fin = (const int64_t *)L->fin.data;
    Py_ssize_t gone = 0;
    for (Py_ssize_t f = 0; f < nfin; f++) {
        int64_t r = fin[f], key = dl[r];
        if (key != rounds) {
            if (key > rounds && cal_push(&L->cal, rounds, key, r)) return -1;  /* delayed: re-file */
            continue;  /* a stale entry (finished, or moved behind the head) */
        }
        dl[r] = 0;
        L->finish[r] = end;
        gone++;
        Py_ssize_t j = bisect_left(dq, r, 0, *head);
        if (j == *head || dq[j] != r) {
            PyErr_Format(PyExc_RuntimeError, "finished request %lld was not decoding", (long long)r);
            return -1;
        }
        if (j < *nd - j - 1) {
            memmove(dq + 1, dq, (size_t)j * sizeof(int64_t));
            dq++;
        } else {
            memmove(dq + j, dq + j + 1, (size_t)(*nd - j - 1) * sizeof(int64_t));
        }
        --*nd;
        --*head;
    }
    *dqp = dq;
    return gone;
}

/* After batches `before`..`batches`: report progress every 2,000 batches, let Ctrl-C through
 * every 65,536. */
static inline int report(Loop *L, size_t before, size_t batches, size_t *next_report, double now, Py_ssize_t i) {
    if (L->progress != Py_None && batches >= *next_report) {
        PyObject *res = PyObject_CallFunction(L->progress, "dn", now, i);
        if (!res) return -1;
        Py_DECREF(res);
        *next_report = batches + 2000;
    }
    if ((before >> 16) != (batches >> 16) && PyErr_CheckSignals()) return -1;
    return 0;
}

/* Record one batch (its end and tokens). */
static inline int emit(Loop *L, size_t *batches, size_t *next_report, double end, int64_t tokens, Py_ssize_t i) {
    if (buf_reserve(&L->ends, sizeof(double)) || buf_reserve(&L->tokens, sizeof(int64_t))) return -1;
    ((double *)L->ends.data)[*batches] = end;
    ((int64_t *)L->tokens.data)[*batches] = tokens;
    L->ends.size += sizeof(double);
    L->tokens.size += sizeof(int64_t);
    ++*batches;
    return report(L, *batches - 1, *batches, next_report, end, i);
}

static int run_loop(Loop *L, Out *o) {
    const int64_t budget = L->budget, cap = L->cap, most = MIN(budget, cap);
    /* The decoding list is dq[:nd], inside a buffer of 2 n_arr + 2 that it may slide along: a
     * removal or insertion moves the shorter side (vLLM v0 piles up thousands of decoders and
     * finishes them at the front).  At most n_arr slides left and n_arr appends: it fits. */
    int64_t *pl = L->pl, *dl = L->dl, *pq = L->pq, *dq = L->dq + L->n_arr + 1;
    /* total_decode: decode tokens left of the decoders (the max-weight rule's D) */
    int64_t in_engine = 0, violations = 0, total_prefill = 0, total_decode = 0, rounds = 0;
    Py_ssize_t i = L->carried, ps = 0, pe = L->n_pre, nd = L->n_dec, head = 0, nrej = 0, n_arr = L->n_arr;
    size_t batches = 0, next_report = 0, turns = 0;
    double now = L->start_now;
    /* Requests carried in: the decoders (true counts) go behind an empty head; the prompts queue. */
    memcpy(dq, L->dq, (size_t)nd * sizeof(int64_t));
    for (Py_ssize_t j = 0; j < nd; j++) {
        total_decode += dl[dq[j]];
        dl[dq[j]] = -dl[dq[j]];
    }
    for (Py_ssize_t q = 0; q < pe; q++) total_prefill += pl[pq[q]];
    in_engine = (int64_t)(pe + nd);

    for (;;) {
        /* Admit every arrival up to this batch boundary (Engine.admit). */
        while (i < n_arr && L->arrivals[i] <= now) {
            int64_t p = L->prompts[i];
            pl[i] = p;
            dl[i] = L->outputs[i];
            if (p > budget && !L->splits_prompts) {
                L->rej[nrej++] = i++;
                continue;
            }
            pq[pe++] = i++;
            total_prefill += p;
            in_engine++;
        }
        if (L->stop && i >= n_arr) break;  /* streaming: the caller brings the next arrivals */
        if (!in_engine) {
            if (i >= n_arr || L->arrivals[i] > L->horizon) break;
            now = L->arrivals[i];
            continue;
        }
        if (now >= L->horizon) break;

        /* The plan, as counts: the n leading decoders get a token, plus prefill chunks. */
        turns++;
        Py_ssize_t nch = 0;
        int64_t n = 0, prefill_tokens = plan_batch(L, ps, pe, dq, nd, total_prefill, total_decode, &n, &nch);
        int64_t num_tokens = n + prefill_tokens, demand = total_prefill + (int64_t)nd, bound;
        if (num_tokens < 1 || num_tokens > budget) {
            PyErr_Format(PyExc_RuntimeError, "planned %lld tokens with demand %lld",
                         (long long)num_tokens, (long long)demand);
            return -1;
        }
        if (in_engine > cap) {  /* Engine.bound under k_max: the cap largest prompts left */
            Py_ssize_t count = pe - ps, q;
            int64_t sum = 0;
            if (count > cap) {
                memcpy(L->tmp, pq + ps, (size_t)count * sizeof(int64_t));
                for (q = 0; q < count; q++) L->tmp[q] = pl[L->tmp[q]];
                qsort(L->tmp, (size_t)count, sizeof(int64_t), cmp_desc);
                count = (Py_ssize_t)cap;
                for (q = 0; q < count; q++) sum += L->tmp[q];
            } else {
                for (q = ps; q < pe; q++) sum += pl[pq[q]];
            }
            bound = MIN(budget, sum + MIN(cap - (int64_t)count, (int64_t)nd));
        } else {
            bound = MIN(budget, demand);
        }
        if (num_tokens != bound) violations++;
        double end = now + L->durations[num_tokens];
        if (L->record) {
            if (buf_reserve(&L->detail, 7 * sizeof(double))) return -1;
            double *d = (double *)(L->detail.data + L->detail.size);
            d[0] = now; d[1] = end; d[2] = (double)prefill_tokens; d[3] = (double)n;
            d[4] = (double)(nch + n); d[5] = (double)demand; d[6] = (double)bound;
            L->detail.size += 7 * sizeof(double);
        }

        /* Decoders joining the head (dq[:n] must be head before a round). */
        for (; head < n; head++) {
            int64_t r = dq[head], key = rounds - dl[r];
            dl[r] = key;
            if (cal_push(&L->cal, rounds, key, r)) return -1;
        }
        /* The decode tokens: who finishes at this batch goes to `fin` (checked below). */
        Py_ssize_t nfin = 0;
        int64_t *fin;
        if (n) {
            if (n < head && n == most) {
                /* No batch can decode more than `most`: the rest of the head goes behind it (once,
                 * instead of paying for it every batch while decoders pile up, as under vLLM v0). */
                for (Py_ssize_t j = n; j < head; j++) dl[dq[j]] = rounds - dl[dq[j]];
                head = n;
            }
            if (n < head && 4 * n <= head - n) {
                /* a short prefix moves one round earlier instead of the rest one round later */
                if (buf_reserve(&L->fin, (size_t)n * sizeof(int64_t))) return -1;
                fin = (int64_t *)L->fin.data;
                for (Py_ssize_t j = 0; j < n; j++) {
                    int64_t r = dq[j], key = dl[r] - 1;
                    dl[r] = key;
                    if (key == rounds) fin[nfin++] = r;
                    else if (cal_push(&L->cal, rounds, key, r)) return -1;
                }
            } else {
                /* the rest of the head misses this round: one later each (entries stay lazy) */
                delay(dl, dq, n, head);
                rounds += 1;
                nfin = cal_take(&L->cal, rounds, &L->fin);
                if (nfin < 0) return -1;
            }
            Py_ssize_t gone = settle(L, nfin, rounds, end, &dq, &nd, &head);
            if (gone < 0) return -1;
            in_engine -= gone;
            total_decode -= n;
        }
        /* The prefill chunks: a completed prompt starts decoding (dq stays sorted by rid). */
        if (nch) {
            total_prefill -= prefill_tokens;
            Py_ssize_t done = 0;
            for (Py_ssize_t c = 0; c < nch; c++) {
                int64_t r = L->chunk_rid[c], left = pl[r] - L->chunk_len[c];
                pl[r] = left;
                if (left) continue;
                done++;
                L->first[r] = end;
                left = dl[r];
                if (left == 0) {
                    L->finish[r] = end;
                    in_engine--;
                    continue;
                }
                Py_ssize_t j = nd;
                if (nd && dq[nd - 1] > r) {
                    j = bisect_left(dq, r, 0, nd);
                    if (j < nd - j) {
                        dq--;
                        memmove(dq, dq + 1, (size_t)j * sizeof(int64_t));
                    } else {
                        memmove(dq + j + 1, dq + j, (size_t)(nd - j) * sizeof(int64_t));
                    }
                }
                dq[j] = r;
                nd++;
                total_decode += left;
                if (j <= head) {  /* joins the head: it finishes `left` rounds from now */
                    head++;
                    dl[r] = rounds + left;
                    if (cal_push(&L->cal, rounds, rounds + left, r)) return -1;
                } else {
                    dl[r] = -left;
                }
            }
            if (done) {
                Py_ssize_t popped = 0;
                while (ps < pe && pl[pq[ps]] == 0) { ps++; popped++; }
                if (popped != done) {
                    Py_ssize_t w = ps;
                    for (Py_ssize_t q = ps; q < pe; q++)
                        if (pl[pq[q]]) pq[w++] = pq[q];
                    pe = w;
                }
            }
        }
        now = end;
        if (emit(L, &batches, &next_report, end, num_tokens, i)) return -1;
        /* Decode-only rounds.  While the plan is "the n leading decoders" (n >= head) it stays the
         * same batch until an arrival, the horizon, a finish or the cap's bound (no plan depends
         * on decode counts, except the max-weight rule's D while prompts wait), so the batches run
         * as rounds without replanning: each ends at now + t_b and the calendar says who finishes.
         * With no prompt waiting every plan decodes the min(decoders, most) leading decoders. */
        int repeat = ps == pe || (nch == 0 && L->load_rule == NO_LOAD_RULE);
        while (repeat && now < L->horizon && !(i < n_arr && L->arrivals[i] <= now) && in_engine <= cap) {
            if (ps == pe) {
                n = MIN((int64_t)nd, most);
            } else {
                Py_ssize_t k = 0;
                if (L->load_rule != NO_LOAD_RULE || plan_batch(L, ps, pe, dq, nd, total_prefill, total_decode, &n, &k)
                    || k)
                    break;
            }
            if (n == 0 || n < head) break;
            for (; head < n; head++) {
                int64_t r = dq[head], key = rounds - dl[r];
                dl[r] = key;
                if (cal_push(&L->cal, rounds, key, r)) return -1;
            }
            demand = total_prefill + (int64_t)nd;
            bound = MIN(budget, demand);
            /* The same batch round after round (up to 4,096 at a time), before the next arrival
             * and the horizon: end = now + t_b each.  A round with calendar entries settles them
             * here; if nobody finished (only delayed entries re-filed) the batch stays the same. */
            double lim = L->horizon;
            if (i < n_arr && L->arrivals[i] < lim) lim = L->arrivals[i];
            const int64_t mask = L->cal.mask, *slot = L->cal.slot;
            int64_t far = L->cal.far.n ? L->cal.far.a[0].key : INT64_MAX;
            const double duration = L->durations[n];
            if (buf_reserve(&L->ends, 4096 * sizeof(double)) || buf_reserve(&L->tokens, 4096 * sizeof(int64_t))
                || (L->record && buf_reserve(&L->detail, 4096 * 7 * sizeof(double))))
                return -1;
            double *ends = (double *)L->ends.data + batches;
            int64_t *toks = (int64_t *)L->tokens.data + batches;
            double *d = L->record ? (double *)(L->detail.data + L->detail.size) : NULL;
            size_t m = 0;
            while (m < 4096 && now < lim) {
                if (d) {
                    d[0] = now; d[1] = now + duration; d[2] = 0.0; d[3] = (double)n; d[4] = (double)n;
                    d[5] = (double)demand; d[6] = (double)bound;
                    d += 7;
                }
                rounds++;
                now += duration;
                ends[m] = now;
                toks[m++] = n;
                if (slot[rounds & mask] >= 0 || rounds >= far) {
                    nfin = cal_take(&L->cal, rounds, &L->fin);
                    if (nfin < 0) return -1;
                    Py_ssize_t gone = settle(L, nfin, rounds, now, &dq, &nd, &head);
                    if (gone < 0) return -1;
                    if (gone) {
                        in_engine -= gone;
                        break;  /* fewer decoders: a new plan */
                    }
                    far = L->cal.far.n ? L->cal.far.a[0].key : INT64_MAX;
                }
            }
            violations += (int64_t)m * (n != bound);
            total_decode -= (int64_t)m * n;
            L->ends.size += m * sizeof(double);
            L->tokens.size += m * sizeof(int64_t);
            if (d) L->detail.size += m * 7 * sizeof(double);
            batches += m;
            if (report(L, batches - m, batches, &next_report, now, i)) return -1;
        }
    }

    /* Leave true decode counts, as reference stepping would. */
    for (Py_ssize_t j = 0; j < nd; j++) {
        int64_t r = dq[j];
        dl[r] = j < head ? dl[r] - rounds : -dl[r];
    }
    o->now = now; o->i = i; o->ps = ps; o->pe = pe; o->ds = dq - L->dq; o->nd = nd; o->nrej = nrej;
    o->in_engine = in_engine; o->violations = violations; o->total_prefill = total_prefill; o->turns = turns;
    return 0;
}

/* ---- the Python entry point ------------------------------------------------------------ */

static int check(Py_buffer *b, const char *name, Py_ssize_t items, Py_ssize_t itemsize) {
    if (b->len != items * itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, expected %zd", name, b->len, items * itemsize);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(run_doc,
"run(arrivals, prompts, outputs, durations, prefill_left, decode_left, first, finish, prefilling,\n"
"    decoding, rejected, plan, useful, breaks, budget, cap, has_useful, splits_prompts, horizon,\n"
"    record, progress, ring, start_now, carried, n_pre, n_dec, stop)\n"
"--\n\n"
"One simulation on the compiled loop (see llmqueue.fastcore, which calls it).  plan is the policy's\n"
"Plan.encode() as int64 (llmqueue.schedulers.plan); useful and breaks are the max-weight load\n"
"rule's candidate loads (int64; has_useful false: every load is useful).  Returns (now, i,\n"
"pre_start, pre_end, dec_start, num_decoding, num_rejected, in_engine, violations, total_prefill,\n"
"ends, tokens, detail, planned) where ends/tokens/detail are bytearrays of float64/int64/7xfloat64\n"
"per batch and planned counts the batches planned in full (the rest ran as decode-only rounds).\n"
"ring caps the calendar's ring of per-round lists (entries further ahead go to a heap).  A resumed\n"
"run starts at start_now with requests [0, carried) in the engine (prefill_left/decode_left/first\n"
"set; their queues in prefilling[:n_pre] and decoding[:n_dec]); stop returns once every arrival\n"
"is admitted, at the boundary where the next ones would be.");

static PyObject *run(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer b[14];
    int has_useful, splits_prompts, record;
    long long budget, cap;
    double horizon, start_now;
    PyObject *progress;
    long long ring;
    Py_ssize_t carried, n_pre, n_dec;
    int stop;
    memset(b, 0, sizeof(b));
    if (!PyArg_ParseTuple(args, "y*y*y*y*w*w*w*w*w*w*w*y*y*y*LLppdpOLdnnnp:run",
                          &b[0], &b[1], &b[2], &b[3], &b[4], &b[5], &b[6], &b[7], &b[8], &b[9], &b[10],
                          &b[11], &b[12], &b[13], &budget, &cap, &has_useful, &splits_prompts, &horizon,
                          &record, &progress, &ring, &start_now, &carried, &n_pre, &n_dec, &stop))
        return NULL;
    PyObject *result = NULL;
    Loop L;
    Out o;
    memset(&L, 0, sizeof(L));
    memset(&o, 0, sizeof(o));
    Py_ssize_t n = b[0].len / (Py_ssize_t)sizeof(double);
    if (check(&b[0], "arrivals", n, 8) || check(&b[1], "prompts", n, 8) || check(&b[2], "outputs", n, 8)
        || check(&b[3], "durations", (Py_ssize_t)budget + 1, 8) || check(&b[4], "prefill_left", n, 8)
        || check(&b[5], "decode_left", n, 8) || check(&b[6], "first", n, 8) || check(&b[7], "finish", n, 8)
        || check(&b[8], "prefilling", n, 8) || check(&b[9], "decoding", 2 * n + 2, 8) || check(&b[10], "rejected", n, 8))
        goto done;
    if (budget < 1 || cap < 1 || b[11].len % 8 || b[12].len % 8 || b[13].len % 8) {
        PyErr_SetString(PyExc_ValueError, "bad engine parameters");
        goto done;
    }
    {   /* the plan: load rule, step count, then 5 ints a step (Plan.encode) */
        const int64_t *plan = b[11].buf;
        Py_ssize_t words = b[11].len / 8;
        if (words < 2 || plan[0] < NO_LOAD_RULE || plan[0] > MAX_WEIGHT_LOAD || plan[1] < 1 || plan[1] > MAX_STEPS
            || words != 2 + 5 * plan[1]) {
            PyErr_SetString(PyExc_ValueError, "bad plan encoding");
            goto done;
        }
        L.load_rule = (int)plan[0];
        L.nsteps = (int)plan[1];
        for (int k = 0; k < L.nsteps; k++) {
            const int64_t *w = plan + 2 + 5 * k;
            PlanStep st = {w[0], w[1], w[2], w[3], w[4]};
            if (st.code < DECODES || st.code > WAITING || st.max_chunk < 1 || st.max_running < 1) {
                PyErr_SetString(PyExc_ValueError, "bad plan step");
                goto done;
            }
            L.steps[k] = st;
        }
        L.useful = has_useful ? b[12].buf : NULL;
        L.n_useful = b[12].len / 8;
        L.breaks = b[13].buf;
        L.n_breaks = b[13].len / 8;
    }
    if (carried < 0 || carried > n || n_pre < 0 || n_dec < 0 || n_pre + n_dec > carried) {
        PyErr_SetString(PyExc_ValueError, "bad carried requests");
        goto done;
    }
    if (progress != Py_None && !PyCallable_Check(progress)) {
        PyErr_SetString(PyExc_TypeError, "progress must be callable or None");
        goto done;
    }
    L.arrivals = b[0].buf; L.prompts = b[1].buf; L.outputs = b[2].buf; L.durations = b[3].buf;
    L.pl = b[4].buf; L.dl = b[5].buf; L.first = b[6].buf; L.finish = b[7].buf;
    L.pq = b[8].buf; L.dq = b[9].buf; L.rej = b[10].buf;
    L.n_arr = n; L.splits_prompts = splits_prompts; L.record = record;
    L.budget = budget; L.cap = cap; L.horizon = horizon;
    L.start_now = start_now; L.carried = carried; L.n_pre = n_pre; L.n_dec = n_dec; L.stop = stop;
    L.progress = progress;
    L.ends.python = L.tokens.python = L.detail.python = 1;
    size_t scratch = (size_t)(budget < n ? budget : n) + 1;  /* chunks: at most one per token and request */
    L.chunk_rid = malloc(scratch * sizeof(int64_t));
    L.chunk_len = malloc(scratch * sizeof(int64_t));
    L.tmp = malloc(((size_t)n + 1) * sizeof(int64_t));
    if (!L.chunk_rid || !L.chunk_len || !L.tmp) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t longest = 0;
    for (Py_ssize_t k = 0; k < n; k++)
        if (L.outputs[k] > longest) longest = L.outputs[k];
    if (cal_init(&L.cal, longest, ring)) goto done;
    if (run_loop(&L, &o) == 0) {
        PyObject *ends = buf_take(&L.ends), *tokens = buf_take(&L.tokens);
        PyObject *detail = record ? buf_take(&L.detail) : (Py_INCREF(Py_None), Py_None);
        if (ends && tokens && detail)
            result = Py_BuildValue("dnnnnnnLLLOOOn", o.now, o.i, o.ps, o.pe, o.ds, o.nd, o.nrej,
                                   (long long)o.in_engine, (long long)o.violations,
                                   (long long)o.total_prefill, ends, tokens, detail, (Py_ssize_t)o.turns);
        Py_XDECREF(ends);
        Py_XDECREF(tokens);
        Py_XDECREF(detail);
    }
done:
    free(L.chunk_rid); free(L.chunk_len); free(L.tmp); free(L.cal.slot); free(L.cal.node_rid); free(L.cal.node_next); free(L.cal.far.a);
    buf_free(&L.fin); buf_free(&L.ends); buf_free(&L.tokens); buf_free(&L.detail);
    for (int k = 0; k < 14; k++)
        if (b[k].obj) PyBuffer_Release(&b[k]);
    return result;
}

static PyMethodDef methods[] = {
    {"run", run, METH_VARARGS, run_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastcore", "The simulator's compiled event loop (llmqueue.fastcore).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastcore(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddStringConstant(m, "SOURCE_SHA256", LLMQUEUE_FASTCORE_SHA256) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
