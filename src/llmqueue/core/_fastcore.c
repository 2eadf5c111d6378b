/* The simulator's compiled core (docs/architecture.md, docs/performance.md; paper §3.1, §5).
 *
 * One engine core, two drivers.  An Engine (below) holds one engine's queues and runs its
 * batches: it plans each batch by interpreting the policy's plan (llmqueue.schedulers.plan:
 * plan_batch() executes the steps Decodes, Prefills, Running, Waiting and the max-weight load
 * rule exactly as plan.interpret does on Request objects, group by group for the class-aware
 * network policies), applies it, and runs decode-only rounds without replanning.  The policy is
 * not written here: run() and run_network() receive each engine's Plan.encode().
 *   run()          one engine fed by an array of arrivals (simulator.simulate, streaming);
 *   run_network()  engines, delay stations and the jobs' routes (forks, joins, loops) of a
 *                  network (network/sim.py): the event loop of network/sim.py in C;
 *   run_pool()     replicas behind a dynamic router (cluster/sim.py): its event loop in C.
 * All give the same batches as the reference loops (loop.py, network/sim.py, cluster/sim.py)
 * bit for bit: batch ends are added one at a time (end = now + t_b) as there.
 *
 * Requests are indices (rid = order of admission).  Plans are counts: a batch gives one decode
 * token to the leading decoders of each queue (every plan step serves a prefix of them) plus
 * prefill chunks.  Lazy decode counts: a queue's leading "head" decoders store the round at
 * which they finish (decode_left = round), so a batch that decodes exactly them adds one to the
 * queue's `rounds`; a calendar of (round, rid) entries says who finishes at each round.  Entries
 * are checked when their round comes (an entry whose request has moved is skipped or re-filed),
 * so a decoder that misses a round costs one integer add.  Decoders behind the head keep
 * -(tokens left).  The calendar is a ring of W per-round lists (W > the longest output, up to
 * `ring`) with a heap for entries further ahead: `rounds` advances one at a time, so each list is
 * taken exactly at its round, in O(1).  Ctrl-C is honoured every 65,536 batches.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Plan steps and load rules: the codes of llmqueue.schedulers.plan (Plan.encode). */
enum { DECODES = 1, PREFILLS = 2, RUNNING = 3, WAITING = 4 };
enum { NO_LOAD_RULE = 0, MAX_WEIGHT_LOAD = 1 };
/* Group orders of the class-aware network policies (network/policies.py). */
enum { ORDER_STATIC = 0, ORDER_PRESSURE = 1 };
#define MAX_STEPS 8

/* plan.Step.encode(); alone_chunk: the chunk cap when the queue holds one request (Running, Waiting:
 * vLLM >= 0.32 lifts long_prefill_token_threshold for a lone request unless cap_alone) */
typedef struct { int64_t code, exclusive, split, max_chunk, max_running, alone_chunk; } PlanStep;

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

/* A binary min-heap of T ordered by LESS(x, y) (pointers): Name_push and Name_pop.  One shape for
 * the calendar's far rounds and the network's events. */
#define DEFINE_HEAP(Name, T, LESS)                                                                   \
    typedef struct { T *a; Py_ssize_t n, cap; } Name;                                                \
    static int Name##_push(Name *h, T x) {                                                          \
        if (h->n == h->cap) {                                                                       \
            Py_ssize_t cap = h->cap ? 2 * h->cap : 1024;                                            \
            T *p = realloc(h->a, (size_t)cap * sizeof(T));                                          \
            if (!p) { PyErr_NoMemory(); return -1; }                                                \
            h->a = p;                                                                               \
            h->cap = cap;                                                                           \
        }                                                                                           \
        Py_ssize_t j = h->n++;                                                                      \
        while (j > 0) {                                                                             \
            Py_ssize_t up = (j - 1) / 2;                                                            \
            if (!LESS(&x, &h->a[up])) break;                                                        \
            h->a[j] = h->a[up];                                                                     \
            j = up;                                                                                 \
        }                                                                                           \
        h->a[j] = x;                                                                                \
        return 0;                                                                                   \
    }                                                                                               \
    static T Name##_pop(Name *h) {                                                                  \
        T top = h->a[0], last = h->a[--h->n];                                                       \
        Py_ssize_t j = 0, n = h->n;                                                                 \
        for (;;) {                                                                                  \
            Py_ssize_t c = 2 * j + 1;                                                               \
            if (c >= n) break;                                                                      \
            if (c + 1 < n && LESS(&h->a[c + 1], &h->a[c])) c++;                                     \
            if (!LESS(&h->a[c], &last)) break;                                                      \
            h->a[j] = h->a[c];                                                                      \
            j = c;                                                                                  \
        }                                                                                           \
        if (n) h->a[j] = last;                                                                      \
        return top;                                                                                 \
    }

#define ENTRY_LESS(x, y) ((x)->key < (y)->key)
DEFINE_HEAP(Heap, Entry, ENTRY_LESS)

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
    if (key - rounds > c->mask) return Heap_push(&c->far, (Entry){key, rid});
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
        ((int64_t *)fin->data)[count++] = Heap_pop(&c->far).rid;
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


/* ---- queues --------------------------------------------------------------------------- */

/* A queue of rids: items a[lo:hi] inside a buffer of cap, with room on both sides, so that an
 * insertion or removal moves the shorter side (vLLM v0 piles up thousands of decoders and
 * finishes them at the front). */
typedef struct { int64_t *a; Py_ssize_t lo, hi, cap; } Deq;

#define DEQ_N(d) ((d)->hi - (d)->lo)
#define DEQ_AT(d) ((d)->a + (d)->lo)

/* Make room for `more` items on each side (recentring, or a larger buffer). */
static int deq_room(Deq *d, Py_ssize_t more) {
    Py_ssize_t n = DEQ_N(d), cap = d->cap;
    if (d->lo >= more && d->cap - d->hi >= more) return 0;
    if (n + 2 * more + 16 > cap) cap = 2 * (n + 2 * more) + 64;
    Py_ssize_t lo = (cap - n) / 2;
    if (cap != d->cap) {
        int64_t *p = malloc((size_t)cap * sizeof(int64_t));
        if (!p) { PyErr_NoMemory(); return -1; }
        if (n) memcpy(p + lo, d->a + d->lo, (size_t)n * sizeof(int64_t));
        free(d->a);
        d->a = p;
        d->cap = cap;
    } else {
        memmove(d->a + lo, d->a + d->lo, (size_t)n * sizeof(int64_t));
    }
    d->lo = lo;
    d->hi = lo + n;
    return 0;
}

static inline int deq_push(Deq *d, int64_t x) {
    if (d->hi == d->cap && deq_room(d, 1)) return -1;
    d->a[d->hi++] = x;
    return 0;
}

/* Insert x before item j (0 <= j <= n), moving the shorter side. */
static int deq_insert(Deq *d, Py_ssize_t j, int64_t x) {
    Py_ssize_t n = DEQ_N(d);
    if ((d->lo == 0 || d->hi == d->cap) && deq_room(d, 1)) return -1;
    if (j < n - j) {
        d->lo--;
        memmove(d->a + d->lo, d->a + d->lo + 1, (size_t)j * sizeof(int64_t));
    } else {
        memmove(d->a + d->lo + j + 1, d->a + d->lo + j, (size_t)(n - j) * sizeof(int64_t));
        d->hi++;
    }
    d->a[d->lo + j] = x;
    return 0;
}

/* Remove item j, moving the shorter side. */
static inline void deq_remove(Deq *d, Py_ssize_t j) {
    Py_ssize_t n = DEQ_N(d);
    if (j < n - j - 1) {
        memmove(d->a + d->lo + 1, d->a + d->lo, (size_t)j * sizeof(int64_t));
        d->lo++;
    } else {
        memmove(d->a + d->lo + j, d->a + d->lo + j + 1, (size_t)(n - j - 1) * sizeof(int64_t));
        d->hi--;
    }
}

/* ---- one engine ----------------------------------------------------------------------- */

/* Per-request state, indexed by rid, shared by the engines of a run (owned by the caller). */
typedef struct {
    int64_t *pl, *dl;              /* prefill_left, decode_left (lazy for head decoders) */
    const int64_t *prompts, *outputs, *group;   /* group: the request's queue at its engine (NULL: 0) */
    double *first, *finish;
} Req;

/* One queue group of an engine (a class or a (class, hop) buffer under a class-aware policy; the
 * whole engine otherwise): prompts with prefill left, FCFS, and decoders sorted by rid. */
typedef struct {
    Deq pq, dq;
    Py_ssize_t head;     /* dq[:head] are head decoders: decode_left = their finishing round */
    int64_t rounds;
    Calendar cal;
} Queue;

typedef struct {
    /* the policy */
    int64_t budget, cap, most;
    int splits_prompts, nsteps, load_rule, G, order_kind;
    PlanStep steps[MAX_STEPS];
    const int64_t *useful, *breaks;   /* max-weight candidate loads; useful == NULL: every load */
    Py_ssize_t n_useful, n_breaks;
    const double *durations;          /* t_b for 0..budget tokens */
    /* max-pressure (network/policies.py MaxPressure): per group its buffer, its downstream buffers
     * ds_buf[ds_start[g]:ds_start[g+1]] with multiplicities ds_p, and 1 / mean tokens */
    const int64_t *buffer, *ds_start, *ds_buf, *counts;
    const double *ds_p, *inv_tokens;
    /* state */
    Req *R;
    Queue *q;
    int64_t in_engine, total_prefill, total_decode, nd, violations;
    /* the batch being applied */
    int64_t *chunk_rid, *chunk_len, *n_of, *done_of, *tmp;
    Py_ssize_t tmp_cap;
    int *order, norder;
    double *key;
    /* a plan made ahead by engine_rounds (it found the next batch is not decode-only): kept for
     * engine_batch until an admission changes the queues */
    int ahead;
    int64_t ahead_prefill, ahead_n;
    Py_ssize_t ahead_nch;
    int collect;          /* keep the finished rids of each batch, in Engine.step's order */
    Buf fin, pfin, dfin;  /* calendar candidates; finished at prefill, at decode */
    Buf rej;              /* rejected rids, in order */
    /* records */
    int record;
    Buf ends, tokens, detail;
    size_t batches, turns;
    struct Reporter *rep;
    /* KV memory (model/kv.py, plan.Memory): kv = KV_NONE | KV_RECOMPUTE | KV_RESERVE; per request
     * its admission stamp, preemptions, peak (most tokens held before a preemption), tokens
     * recomputed and a planning mark (== mark_base: served in this batch; mark_base + 1: preempted) */
    int kv, kv_stopped, kv_limited, kv_error;
    int64_t kv_usable, kv_bs, kv_used, kv_free, kv_running, stamps, mark_base;
    int64_t memory_limited, preemptions, recomputed;
    int64_t *stamp, *npre, *peak, *recomp, *mark;
    int64_t *cnt;         /* recompute: head decoders per block phase (phase_add) */
    Py_ssize_t dq_served, dq_gone;   /* while planning: decoders served (a prefix of dq), preempted (a suffix) */
    int64_t dec_need;     /* while planning: new blocks of the decoders served */
    Buf victims;          /* rids preempted while planning, in order */
    Buf kvb, kvw, kvs;    /* per batch: blocks in use, tokens recomputed, start time */
} Engine;

enum { KV_NONE = 0, KV_RECOMPUTE = 1, KV_RESERVE = 2 };

/* The room and request slots left while a batch is planned, and its pieces so far. */
typedef struct { int64_t room, slots, n; Py_ssize_t nch; } Build;

static inline void add_chunk(Engine *E, Build *b, int64_t r, int64_t c) {
    E->chunk_rid[b->nch] = r;
    E->chunk_len[b->nch++] = c;
    b->room -= c;
    b->slots -= 1;
}

/* The next k leading decoders get a token (BatchBuilder.add_decodes). */
static inline void decodes(Build *b, int64_t k) {
    k = MIN(MIN(k, b->room), b->slots);
    if (k > 0) { b->n += k; b->room -= k; b->slots -= k; }
}

/* plan.Prefills: chunks of the prompts in order, each the whole prompt left, at most max_chunk,
 * cut to the room when split (else it and those behind it wait). */
static inline void prefills(Engine *E, Build *b, const int64_t *pq, Py_ssize_t npq, int split, int64_t max_chunk) {
    for (Py_ssize_t q = 0; q < npq; q++) {
        if (b->room == 0 || b->slots == 0) break;
        int64_t r = pq[q], want = MIN(E->R->pl[r], max_chunk), c = MIN(want, b->room);
        if (c < want && !split) break;
        add_chunk(E, b, r, c);
    }
}

/* How many prompts at the front are partly prefilled (vLLM v1's running prompts). */
static inline Py_ssize_t started(const Req *R, const int64_t *pq, Py_ssize_t npq) {
    Py_ssize_t q = 0;
    while (q < npq && R->pl[pq[q]] != R->prompts[pq[q]]) q++;
    return q;
}

/* plan.Running: decoders and started prompts interleaved in admission order (rid). */
static inline void running(Engine *E, Build *b, const int64_t *pq, Py_ssize_t count, const int64_t *dq,
                           Py_ssize_t nd, int64_t max_chunk) {
    Py_ssize_t prev = 0;
    for (Py_ssize_t q = 0; q < count; q++) {
        int64_t r = pq[q];
        Py_ssize_t pos = bisect_left(dq, r, prev, nd);
        decodes(b, (int64_t)(pos - prev));
        if (b->room && b->slots) add_chunk(E, b, r, MIN(MIN(E->R->pl[r], max_chunk), b->room));
        prev = pos;
    }
    decodes(b, (int64_t)(nd - prev));
}

/* plan.Waiting: new prompts FCFS while fewer than max_running requests run. */
static inline void waiting(Engine *E, Build *b, const int64_t *pq, Py_ssize_t npq, Py_ssize_t count, Py_ssize_t nd,
                           int64_t max_chunk, int64_t max_running) {
    int64_t run = (int64_t)count + (int64_t)nd;
    for (Py_ssize_t q = count; q < npq; q++) {
        if (b->room == 0 || b->slots == 0 || run >= max_running) break;
        add_chunk(E, b, pq[q], MIN(MIN(E->R->pl[pq[q]], max_chunk), b->room));
        run++;
    }
}

static inline void consider(const Engine *E, int64_t b, int64_t y, int64_t P, int64_t D, double *best,
                            int64_t *load, int64_t *dec) {
    double score = (double)(P * (b - y) + D * y) / E->durations[b];
    if (score > *best || (score == *best && b > *load)) { *best = score; *load = b; *dec = y; }
}

/* MaxWeightLoad.choose (schedulers/maxweight.py): the load and decode count maximising
 * (P x + D y) / t_b over the candidate loads of each shape.  P: prefill tokens left, D: decode
 * tokens left of the decoders (one queue: the rule is not combined with groups). */
static void max_weight(const Engine *E, const Queue *Q, int64_t *load, int64_t *dec) {
    int64_t budget = E->budget, k = E->cap < NO_CAP ? E->cap : budget, P = E->total_prefill, D = E->total_decode;
    const int64_t *pq = DEQ_AT(&Q->pq);
    Py_ssize_t npq = DEQ_N(&Q->pq), nd = DEQ_N(&Q->dq);
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
                for (Py_ssize_t q = 0; q < npq && q < slots; q++) {
                    x_cap += E->R->pl[pq[q]];
                    if (x_cap >= room) break;
                }
                x_cap = MIN(x_cap, room);
            }
        }
        int64_t lo = y > 1 ? y : 1, hi = y + x_cap;
        if (hi < lo) continue;
        consider(E, lo, y, P, D, &best, load, dec);
        consider(E, hi, y, P, D, &best, load, dec);
        for (Py_ssize_t j = bisect_left(E->breaks, lo, 0, E->n_breaks); j < E->n_breaks && E->breaks[j] <= hi; j++)
            consider(E, E->breaks[j], y, P, D, &best, load, dec);
        if (E->useful) {
            Py_ssize_t j = bisect_left(E->useful, lo, 0, E->n_useful);
            if (j < E->n_useful && E->useful[j] <= hi) consider(E, E->useful[j], y, P, D, &best, load, dec);
            j = bisect_left(E->useful, hi + 1, 0, E->n_useful) - 1;
            if (j >= 0 && E->useful[j] >= lo) consider(E, E->useful[j], y, P, D, &best, load, dec);
        }
    }
}

/* The plan's steps on one queue (plan.interpret; GroupedScheduler.plan gives each group the
 * room the earlier groups left, and `exclusive` ends only that group's steps). */
static inline void plan_queue(Engine *E, const Queue *Q, Build *b, int64_t most_decodes) {
    const int64_t *pq = DEQ_AT(&Q->pq), *dq = DEQ_AT(&Q->dq);
    Py_ssize_t npq = DEQ_N(&Q->pq), nd = DEQ_N(&Q->dq), count = -1;   /* count: started prompts, once */
    int alone = npq + nd <= 1;   /* at the batch's start (plan.interpret) */
    for (int k = 0; k < E->nsteps && b->room && b->slots; k++) {
        const PlanStep *s = &E->steps[k];
        int64_t max_chunk = alone ? s->alone_chunk : s->max_chunk;
        int stop = 0;
        switch (s->code) {
        case DECODES:
            stop = s->exclusive && nd;
            decodes(b, stop ? (int64_t)nd : MIN((int64_t)nd, most_decodes));
            break;
        case PREFILLS:
            stop = s->exclusive && npq;
            prefills(E, b, pq, npq, (int)s->split, s->max_chunk);
            break;
        case RUNNING:
            if (count < 0) count = started(E->R, pq, npq);
            running(E, b, pq, count, dq, nd, max_chunk);
            break;
        default:
            if (count < 0) count = started(E->R, pq, npq);
            waiting(E, b, pq, npq, count, nd, max_chunk, s->max_running);
        }
        if (stop) break;
    }
}

/* ---- KV memory while planning (plan.Memory, plan.interpret_kv) ---------------------------- */

static inline int push_rid(Buf *b, int64_t r);

static inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* plan.seq_len: prompt + tokens generated (a preempted decoder's recompute holds its next token). */
static inline int64_t seqlen(const Engine *E, int64_t r) { return E->R->prompts[r] + E->R->outputs[r] - E->R->dl[r]; }

/* Tokens whose KV the request holds. */
static inline int64_t kv_done(const Engine *E, int64_t r) { return seqlen(E, r) - E->R->pl[r]; }

/* plan.started_kv: prompts at the front holding blocks. */
static inline Py_ssize_t started_kv(const Engine *E, const int64_t *pq, Py_ssize_t npq) {
    Py_ssize_t q = 0;
    while (q < npq && E->R->pl[pq[q]] != seqlen(E, pq[q])) q++;
    return q;
}

/* The first position in dq[0:n] (admission order) whose stamp is >= x. */
static Py_ssize_t bisect_stamp(const Engine *E, const int64_t *dq, Py_ssize_t n, int64_t x) {
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (E->stamp[dq[mid]] < x) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* Decode tokens left of the decoder at dq[j]: a head decoder holds its finishing round (lazy
 * counts), one behind the head minus its count. */
static inline int64_t dec_left(const Engine *E, const Queue *Q, Py_ssize_t j) {
    int64_t d = E->R->dl[DEQ_AT(&Q->dq)[j]];
    return j < Q->head ? d - Q->rounds : -d;
}

/* Tokens held by the decoder at dq[j]. */
static inline int64_t dec_done(const Engine *E, const Queue *Q, Py_ssize_t j) {
    int64_t r = DEQ_AT(&Q->dq)[j];
    return E->R->prompts[r] + E->R->outputs[r] - dec_left(E, Q, j);
}

/* A head decoder's block phase (recompute): its next token starts a block when
 * (phase + rounds) % block_size == 0, so cnt[phase] counts the head decoders of each phase and
 * cnt[-rounds mod block_size] those that need a block in a round that serves the whole head. */
static inline void phase_add(Engine *E, int64_t r, int64_t delta) {
    int64_t m = (E->R->prompts[r] + E->R->outputs[r] - E->R->dl[r]) % E->kv_bs;
    E->cnt[m < 0 ? m + E->kv_bs : m] += delta;
}

static inline int is_gone(const Engine *E, int64_t r) { return E->mark[r] == E->mark_base + 1; }

/* Memory.grow: blocks for n more tokens of a running request r holding `done` tokens, preempting
 * the tail until they fit; 0 when r preempted itself (planning stops).  The tail (Memory._tail) is
 * the most recently admitted running request not served in this batch: the last decoder not
 * served nor preempted (served decoders are a prefix of dq, preempted ones a suffix) or the last
 * such started prompt (marked), whichever came later. */
static int kv_grow(Engine *E, const Queue *Q, Py_ssize_t ns, int64_t r, int64_t done, int64_t n) {
    if (E->kv == KV_RESERVE) return 1;
    const int64_t bs = E->kv_bs, need = cdiv(done + n, bs) - cdiv(done, bs);
    const int64_t *dq = DEQ_AT(&Q->dq), *pq = DEQ_AT(&Q->pq);
    while (need > E->kv_free) {
        E->kv_limited = 1;
        Py_ssize_t jd = DEQ_N(&Q->dq) - E->dq_gone - 1, q = ns;
        while (q-- > 0 && E->mark[pq[q]] >= E->mark_base) {}
        int64_t v, freed;
        if (jd >= E->dq_served && (q < 0 || E->stamp[dq[jd]] > E->stamp[pq[q]])) {
            v = dq[jd];
            freed = cdiv(dec_done(E, Q, jd), bs);
            E->dq_gone++;
        } else if (q >= 0) {
            v = pq[q];
            freed = cdiv(kv_done(E, v), bs);
        } else {
            E->kv_error = 1;
            E->kv_stopped = 1;
            return 0;
        }
        if (push_rid(&E->victims, v)) { E->kv_error = 1; E->kv_stopped = 1; return 0; }
        E->mark[v] = E->mark_base + 1;
        E->kv_free += freed;
        E->kv_running--;
        if (v == r) { E->kv_stopped = 1; return 0; }
    }
    E->kv_free -= need;
    return 1;
}

/* Memory.admit: start waiting request r with a first chunk of c tokens, if memory allows (never in
 * a batch with a preemption; recompute: its whole sequence must fit; reserve: prompt + output). */
static int kv_admit(Engine *E, int64_t r, int64_t c) {
    if (E->victims.size) return 0;
    const int64_t bs = E->kv_bs;
    int64_t whole = cdiv(E->kv == KV_RESERVE ? E->R->prompts[r] + E->R->outputs[r] : seqlen(E, r), bs);
    if (whole > E->kv_free) { E->kv_limited = 1; return 0; }
    E->kv_free -= E->kv == KV_RESERVE ? whole : cdiv(c, bs);
    E->mark[r] = E->mark_base;
    E->kv_running++;
    return 1;
}

#define KV_ROOM(b) ((b)->room && (b)->slots && !E->kv_stopped)

/* The next decoder (dq[dq_served]) gets a token if its block fits (Memory.grow). */
static inline int decode_one(Engine *E, const Queue *Q, Build *b, Py_ssize_t ns) {
    Py_ssize_t j = E->dq_served;
    int64_t done = dec_done(E, Q, j);
    if (!kv_grow(E, Q, ns, DEQ_AT(&Q->dq)[j], done, 1)) return 0;
    if (E->kv == KV_RECOMPUTE) E->dec_need += done % E->kv_bs == 0;
    E->dq_served++;
    b->n++; b->room--; b->slots--;
    return 1;
}

/* plan.Decodes with memory: the leading decoders, one token each.  perf: when the whole head is
 * served and its blocks fit, the phase counts give their blocks at once (O(1), as the lazy rounds
 * are); else one by one, preempting as vLLM does. */
static void decodes_kv(Engine *E, const Queue *Q, Build *b, Py_ssize_t ns, int64_t limit) {
    Py_ssize_t alive = DEQ_N(&Q->dq) - E->dq_gone;
    int64_t k = MIN(MIN((int64_t)alive, b->room), MIN(b->slots, limit));
    if (k <= 0) return;
    if (E->kv == KV_RESERVE && !E->dq_served) {
        E->dq_served = (Py_ssize_t)k;
        b->n += k; b->room -= k; b->slots -= k;
        return;
    }
    if (!E->dq_served && k >= Q->head) {
        /* The k leading decoders need `need` new blocks.  Walking them one by one (Memory.grow),
         * a decoder that finds no free block preempts the tail until one is free; the victims
         * in the end are the shortest tail whose blocks cover what the rest need, so they can be
         * taken here at once.  The last decoder served preempts itself when only its own block
         * is missing and it is the tail. */
        const int64_t bs = E->kv_bs;
        const int64_t *dq = DEQ_AT(&Q->dq), *pq = DEQ_AT(&Q->pq);
        int64_t m = (-Q->rounds) % bs, need = Q->head ? E->cnt[m < 0 ? m + bs : m] : 0;
        for (Py_ssize_t j = Q->head; j < k; j++) need += dec_done(E, Q, j) % bs == 0;
        while (need > E->kv_free) {
            E->kv_limited = 1;
            Py_ssize_t jd = DEQ_N(&Q->dq) - E->dq_gone - 1, q = ns;
            while (q-- > 0 && E->mark[pq[q]] >= E->mark_base) {}
            int64_t v;
            if (jd >= 0 && (q < 0 || E->stamp[dq[jd]] > E->stamp[pq[q]])) {
                v = dq[jd];
                int64_t done = dec_done(E, Q, jd), own = jd < k && done % bs == 0;
                E->dq_gone++;
                E->kv_free += cdiv(done, bs);
                if (jd < k) {   /* one of the k (the last): it leaves them */
                    k--;
                    if (own && need - 1 <= E->kv_free - cdiv(done, bs)) E->kv_stopped = 1;   /* itself */
                    need -= own;
                }
            } else if (q >= 0) {
                v = pq[q];
                E->kv_free += cdiv(kv_done(E, v), bs);
            } else {
                E->kv_error = 1;
                E->kv_stopped = 1;
                return;
            }
            if (push_rid(&E->victims, v)) { E->kv_error = 1; E->kv_stopped = 1; return; }
            E->mark[v] = E->mark_base + 1;
            E->kv_running--;
            if (E->kv_stopped) break;
        }
        E->kv_free -= need;
        E->dec_need += need;
        E->dq_served = (Py_ssize_t)k;
        b->n += k; b->room -= k; b->slots -= k;
        return;
    }
    for (int64_t t = 0; t < k && KV_ROOM(b) && E->dq_served < DEQ_N(&Q->dq) - E->dq_gone; t++)
        if (!decode_one(E, Q, b, ns)) break;
}

static void prefills_kv(Engine *E, const Queue *Q, Build *b, Py_ssize_t ns, int split, int64_t max_chunk) {
    const int64_t *pq = DEQ_AT(&Q->pq);
    Py_ssize_t npq = DEQ_N(&Q->pq);
    for (Py_ssize_t q = 0; q < npq && KV_ROOM(b); q++) {
        int64_t r = pq[q], left = E->R->pl[r], want = MIN(left, max_chunk), c = MIN(want, b->room);
        if (is_gone(E, r)) return;
        if (c < want && !split && !(want > E->budget && b->room == E->budget)) return;
        if (left != seqlen(E, r)) {
            if (!kv_grow(E, Q, ns, r, kv_done(E, r), c)) return;
            E->mark[r] = E->mark_base;
        } else if (!kv_admit(E, r, c)) {
            return;
        }
        add_chunk(E, b, r, c);
        if (c < want) return;
    }
}

/* vLLM's running loop: decoders and started prompts merged in admission order (when every started
 * prompt came after every decoder, the decoders first, at once). */
static void running_kv(Engine *E, const Queue *Q, Build *b, Py_ssize_t ns, int64_t max_chunk) {
    const int64_t *dq = DEQ_AT(&Q->dq), *pq = DEQ_AT(&Q->pq), *stamp = E->stamp;
    Py_ssize_t nd = DEQ_N(&Q->dq), q = 0;
    if (!ns || !nd || stamp[pq[0]] > stamp[dq[nd - 1]]) {
        decodes_kv(E, Q, b, ns, NO_CAP);
        nd = 0;
    }
    while ((E->dq_served < nd - E->dq_gone || q < ns) && KV_ROOM(b)) {
        Py_ssize_t j = E->dq_served;
        if (j < nd - E->dq_gone && (q >= ns || stamp[dq[j]] < stamp[pq[q]])) {
            if (!decode_one(E, Q, b, ns)) return;
            continue;
        }
        int64_t r = pq[q++];
        if (is_gone(E, r)) continue;
        int64_t c = MIN(MIN(E->R->pl[r], max_chunk), b->room);
        if (kv_grow(E, Q, ns, r, kv_done(E, r), c)) {
            E->mark[r] = E->mark_base;
            add_chunk(E, b, r, c);
        }
    }
}

static void waiting_kv(Engine *E, const Queue *Q, Build *b, Py_ssize_t ns, int64_t max_chunk, int64_t max_running) {
    const int64_t *pq = DEQ_AT(&Q->pq);
    Py_ssize_t npq = DEQ_N(&Q->pq);
    for (Py_ssize_t q = ns; q < npq && KV_ROOM(b) && !E->victims.size && E->kv_running < max_running; q++) {
        int64_t r = pq[q], c = MIN(MIN(E->R->pl[r], max_chunk), b->room);
        if (!kv_admit(E, r, c)) return;
        add_chunk(E, b, r, c);
    }
}

/* plan.interpret_kv on the one queue; an exclusive step that served anything has the batch. */
static void plan_queue_kv(Engine *E, const Queue *Q, Build *b, int64_t most_decodes) {
    Py_ssize_t ns = started_kv(E, DEQ_AT(&Q->pq), DEQ_N(&Q->pq));
    E->mark_base += 2;
    E->kv_free = E->kv_usable - E->kv_used;
    E->kv_running = (int64_t)ns + (int64_t)DEQ_N(&Q->dq);
    E->victims.size = 0;
    E->kv_stopped = E->kv_limited = 0;
    E->dq_served = E->dq_gone = 0;
    E->dec_need = 0;
    int alone = DEQ_N(&Q->pq) + DEQ_N(&Q->dq) <= 1;   /* at the batch's start, preempted ones included */
    for (int k = 0; k < E->nsteps && KV_ROOM(b); k++) {
        const PlanStep *s = &E->steps[k];
        int64_t before = b->room, max_chunk = alone ? s->alone_chunk : s->max_chunk;
        switch (s->code) {
        case DECODES:
            decodes_kv(E, Q, b, ns, s->exclusive ? NO_CAP : most_decodes);
            break;
        case PREFILLS:
            prefills_kv(E, Q, b, ns, (int)s->split, s->max_chunk);
            break;
        case RUNNING:
            running_kv(E, Q, b, ns, max_chunk);
            break;
        default:
            waiting_kv(E, Q, b, ns, max_chunk, s->max_running);
        }
        if (s->exclusive && b->room < before) break;
    }
}

/* MaxPressure.pressure: (Z_b - sum_l P_bl Z_l) / m_b, summed left to right as the reference. */
static double pressure(const Engine *E, int g) {
    double acc = 0.0;
    for (int64_t j = E->ds_start[g]; j < E->ds_start[g + 1]; j++) acc += E->ds_p[j] * (double)E->counts[E->ds_buf[j]];
    return ((double)E->counts[E->buffer[g]] - acc) * E->inv_tokens[g];
}

/* The groups with work in the order this batch serves them: index order (class priority), or by
 * decreasing pressure, then the oldest request first (MaxPressure.order). */
static void order_groups(Engine *E) {
    int m = 0;
    for (int g = 0; g < E->G; g++) {
        const Queue *Q = &E->q[g];
        if (!DEQ_N(&Q->pq) && !DEQ_N(&Q->dq)) continue;
        if (E->order_kind == ORDER_PRESSURE) {
            int64_t head = DEQ_N(&Q->dq) ? DEQ_AT(&Q->dq)[0] : INT64_MAX;
            if (DEQ_N(&Q->pq) && DEQ_AT(&Q->pq)[0] < head) head = DEQ_AT(&Q->pq)[0];
            double key = -pressure(E, g);
            /* insertion sort by (key, head, g): a handful of groups */
            int j = m;
            while (j > 0) {
                int h = E->order[j - 1];
                double hk = E->key[h];
                const Queue *H = &E->q[h];
                int64_t hh = DEQ_N(&H->dq) ? DEQ_AT(&H->dq)[0] : INT64_MAX;
                if (DEQ_N(&H->pq) && DEQ_AT(&H->pq)[0] < hh) hh = DEQ_AT(&H->pq)[0];
                if (hk < key || (hk == key && hh < head)) break;
                E->order[j] = h;
                j--;
            }
            E->key[g] = key;
            E->order[j] = g;
        } else {
            E->order[m] = g;
        }
        m++;
    }
    E->norder = m;
}

/* The next batch (plan.interpret as counts): n_of[g] leading decoders of each queue g, and the
 * chunks.  Returns the prefill tokens; *n_out the decode tokens. */
static inline int64_t plan_batch(Engine *E, int64_t *n_out, Py_ssize_t *nch) {
    Build b = {E->budget, E->cap, 0, 0};
    int64_t most_decodes = NO_CAP, total = 0;
    if (E->load_rule == MAX_WEIGHT_LOAD) max_weight(E, &E->q[0], &b.room, &most_decodes);
    int64_t load = b.room;
    if (E->G == 1) {
        E->order[0] = 0;
        E->norder = 1;
        if (E->kv) plan_queue_kv(E, &E->q[0], &b, most_decodes);
        else plan_queue(E, &E->q[0], &b, most_decodes);
        E->n_of[0] = total = b.n;
    } else {
        order_groups(E);
        for (int g = 0; g < E->G; g++) E->n_of[g] = 0;
        for (int o = 0; o < E->norder && b.room && b.slots; o++) {
            b.n = 0;
            plan_queue(E, &E->q[E->order[o]], &b, most_decodes);
            E->n_of[E->order[o]] = b.n;
            total += b.n;
        }
    }
    *n_out = total;
    *nch = b.nch;
    return load - b.room - total;
}

/* Engine.bound: the tokens a work-conserving batch holds now (cap-aware under k_max). */
static inline int64_t work_bound(Engine *E, int64_t demand) {
    if (E->in_engine <= E->cap) return MIN(E->budget, demand);
    Py_ssize_t count = 0;
    for (int g = 0; g < E->G; g++) count += DEQ_N(&E->q[g].pq);
    int64_t sum = 0, cap = E->cap;
    if (count > cap) {
        if (count > E->tmp_cap) {
            int64_t *p = realloc(E->tmp, (size_t)count * sizeof(int64_t));
            if (!p) { PyErr_NoMemory(); return -1; }
            E->tmp = p;
            E->tmp_cap = count;
        }
        Py_ssize_t k = 0;
        for (int g = 0; g < E->G; g++) {
            const Deq *d = &E->q[g].pq;
            for (Py_ssize_t q = 0; q < DEQ_N(d); q++) E->tmp[k++] = E->R->pl[DEQ_AT(d)[q]];
        }
        qsort(E->tmp, (size_t)count, sizeof(int64_t), cmp_desc);
        count = (Py_ssize_t)cap;
        for (Py_ssize_t q = 0; q < count; q++) sum += E->tmp[q];
    } else {
        for (int g = 0; g < E->G; g++) {
            const Deq *d = &E->q[g].pq;
            for (Py_ssize_t q = 0; q < DEQ_N(d); q++) sum += E->R->pl[DEQ_AT(d)[q]];
        }
    }
    return MIN(E->budget, sum + MIN(cap - (int64_t)count, E->nd));
}

static inline int push_rid(Buf *b, int64_t r) {
    if (buf_reserve(b, sizeof(int64_t))) return -1;
    ((int64_t *)b->data)[b->size / sizeof(int64_t)] = r;
    b->size += sizeof(int64_t);
    return 0;
}

static int cmp_asc(const void *x, const void *y) {
    int64_t a = *(const int64_t *)x, b = *(const int64_t *)y;
    return (a > b) - (a < b);
}

/* Settle fin[0:nfin], queue Q's calendar candidates at its current round: finish those due (they
 * leave Q's decoding list, whose head they are in), re-file delayed ones at their true round,
 * skip stale ones.  Returns how many finished, or -1. */
static Py_ssize_t settle(Engine *E, Queue *Q, Py_ssize_t nfin, double end) {
    int64_t *dl = E->R->dl, rounds = Q->rounds;
    const int64_t *fin = (const int64_t *)E->fin.data;
    size_t before = E->dfin.size;
    Py_ssize_t gone = 0;
    for (Py_ssize_t f = 0; f < nfin; f++) {
        int64_t r = fin[f], key = dl[r];
        if (E->kv && E->R->pl[r]) continue;   /* preempted: a stale entry (dl is its true count now) */
        if (key != rounds) {
            if (key > rounds && cal_push(&Q->cal, rounds, key, r)) return -1;  /* delayed: re-file */
            continue;  /* a stale entry (finished, or moved behind the head) */
        }
        if (E->kv) {
            if (E->cnt) phase_add(E, r, -1);
            E->kv_used -= cdiv(E->R->prompts[r] + E->R->outputs[r], E->kv_bs);
        }
        dl[r] = 0;
        E->R->finish[r] = end;
        gone++;
        Py_ssize_t j = E->kv ? bisect_stamp(E, DEQ_AT(&Q->dq), Q->head, E->stamp[r]) : bisect_left(DEQ_AT(&Q->dq), r, 0, Q->head);
        if (j == Q->head || DEQ_AT(&Q->dq)[j] != r) {
            PyErr_Format(PyExc_RuntimeError, "finished request %lld was not decoding", (long long)r);
            return -1;
        }
        deq_remove(&Q->dq, j);
        Q->head--;
        if (E->collect && push_rid(&E->dfin, r)) return -1;
    }
    if (E->collect && gone > 1)  /* Engine.step lists a batch's decoders in order */
        qsort(E->dfin.data + before, (size_t)gone, sizeof(int64_t), cmp_asc);
    E->in_engine -= gone;
    E->nd -= gone;
    return gone;
}

/* Give one decode token to Q's n leading decoders, ending at `end`. */
static int apply_decodes(Engine *E, Queue *Q, int64_t n, double end) {
    int64_t *dl = E->R->dl;
    int64_t *dq = DEQ_AT(&Q->dq);
    /* Decoders joining the head (dq[:n] must be head before a round). */
    for (; Q->head < n; Q->head++) {
        int64_t r = dq[Q->head], key = Q->rounds - dl[r];
        dl[r] = key;
        if (E->cnt) phase_add(E, r, 1);
        if (cal_push(&Q->cal, Q->rounds, key, r)) return -1;
    }
    if (n < Q->head && n == E->most) {
        /* No batch can decode more than `most`: the rest of the head goes behind it (once,
         * instead of paying for it every batch while decoders pile up, as under vLLM v0). */
        for (Py_ssize_t j = n; j < Q->head; j++) {
            if (E->cnt) phase_add(E, dq[j], -1);
            dl[dq[j]] = Q->rounds - dl[dq[j]];
        }
        Q->head = n;
    }
    Py_ssize_t nfin = 0;
    if (n < Q->head && 4 * n <= Q->head - n) {
        /* a short prefix moves one round earlier instead of the rest one round later */
        if (buf_reserve(&E->fin, (size_t)n * sizeof(int64_t))) return -1;
        int64_t *fin = (int64_t *)E->fin.data;
        for (Py_ssize_t j = 0; j < n; j++) {
            int64_t r = dq[j], key = dl[r] - 1;
            if (E->cnt) phase_add(E, r, -1);
            dl[r] = key;
            if (E->cnt) phase_add(E, r, 1);
            if (key == Q->rounds) fin[nfin++] = r;
            else if (cal_push(&Q->cal, Q->rounds, key, r)) return -1;
        }
    } else {
        /* the rest of the head misses this round: one later each (entries stay lazy) */
        if (E->cnt) for (Py_ssize_t j = n; j < Q->head; j++) phase_add(E, dq[j], -1);
        delay(dl, dq, n, Q->head);
        if (E->cnt) for (Py_ssize_t j = n; j < Q->head; j++) phase_add(E, dq[j], 1);
        Q->rounds += 1;
        nfin = cal_take(&Q->cal, Q->rounds, &E->fin);
        if (nfin < 0) return -1;
    }
    E->total_decode -= n;
    return settle(E, Q, nfin, end) < 0 ? -1 : 0;
}

/* The prefill chunks of the batch: a completed prompt starts decoding (its queue's dq stays
 * sorted by rid), or finishes when it has no output. */
static int apply_chunks(Engine *E, Py_ssize_t nch, double end) {
    Req *R = E->R;
    int64_t *pl = R->pl, *dl = R->dl;
    int any = 0;
    for (Py_ssize_t c = 0; c < nch; c++) {
        int64_t r = E->chunk_rid[c], left = pl[r] - E->chunk_len[c];
        pl[r] = left;
        if (left) continue;
        int g = E->G > 1 ? (int)R->group[r] : 0;
        Queue *Q = &E->q[g];
        E->done_of[g]++;
        any = 1;
        if (isnan(R->first[r])) R->first[r] = end;   /* a recompute after preemption keeps its first token */
        left = dl[r];
        if (left == 0) {
            R->finish[r] = end;
            E->in_engine--;
            if (E->kv) E->kv_used -= cdiv(R->prompts[r] + R->outputs[r], E->kv_bs);
            if (E->collect && push_rid(&E->pfin, r)) return -1;
            continue;
        }
        Py_ssize_t nd = DEQ_N(&Q->dq), j = nd;
        if (E->kv) {  /* with memory, decoders are in admission order */
            if (nd && E->stamp[DEQ_AT(&Q->dq)[nd - 1]] > E->stamp[r]) j = bisect_stamp(E, DEQ_AT(&Q->dq), nd, E->stamp[r]);
        } else if (nd && DEQ_AT(&Q->dq)[nd - 1] > r) {
            j = bisect_left(DEQ_AT(&Q->dq), r, 0, nd);
        }
        if (j == nd ? deq_push(&Q->dq, r) : deq_insert(&Q->dq, j, r)) return -1;
        E->nd++;
        E->total_decode += left;
        if (j <= Q->head) {  /* joins the head: it finishes `left` rounds from now */
            Q->head++;
            dl[r] = Q->rounds + left;
            if (E->cnt) phase_add(E, r, 1);
            if (cal_push(&Q->cal, Q->rounds, Q->rounds + left, r)) return -1;
        } else {
            dl[r] = -left;
        }
    }
    if (!any) return 0;
    /* Drop the completed prompts: from the front (FCFS: the usual case), else anywhere. */
    for (int g = 0; g < E->G; g++) {
        int64_t done = E->done_of[g];
        if (!done) continue;
        E->done_of[g] = 0;
        Deq *d = &E->q[g].pq;
        int64_t popped = 0;
        while (DEQ_N(d) && pl[d->a[d->lo]] == 0) { d->lo++; popped++; }
        if (popped != done) {
            Py_ssize_t w = d->lo;
            for (Py_ssize_t q = d->lo; q < d->hi; q++)
                if (pl[d->a[q]]) d->a[w++] = d->a[q];
            d->hi = w;
        }
    }
    return 0;
}

/* Progress and Ctrl-C, shared by the engines of a run: report every 2,000 batches, let signals
 * through every 65,536. */
typedef struct Reporter {
    PyObject *progress;   /* None, or called with (now, admitted) (single engine) or (now,) (network) */
    int network;
    size_t batches, next_report;
    Py_ssize_t admitted;
} Reporter;

static int report_slow(Reporter *P, size_t before, double now) {
    if (P->progress != Py_None && P->batches >= P->next_report) {
        PyObject *res = P->network ? PyObject_CallFunction(P->progress, "(d)", now)
                                   : PyObject_CallFunction(P->progress, "dn", now, P->admitted);
        if (!res) return -1;
        Py_DECREF(res);
        P->next_report = P->batches + 2000;
    }
    if ((before >> 16) != (P->batches >> 16) && PyErr_CheckSignals()) return -1;
    return 0;
}

/* perf: inline, and the Python calls only every so often (this runs once per batch) */
static inline int report(Reporter *P, size_t added, double now) {
    size_t before = P->batches;
    P->batches += added;
    if ((P->progress == Py_None || P->batches < P->next_report) && (before >> 16) == (P->batches >> 16)) return 0;
    return report_slow(P, before, now);
}

/* Queue a request at the engine (Engine.admit); 1 accepted, 0 rejected, -1 error. */
static inline int engine_admit(Engine *E, int64_t r) {
    Req *R = E->R;
    int64_t p = R->prompts[r];
    R->pl[r] = p;
    R->dl[r] = R->outputs[r];
    if (p > E->budget && !E->splits_prompts) return push_rid(&E->rej, r) ? -1 : 0;
    if (E->kv && cdiv(p + R->outputs[r], E->kv_bs) > E->kv_usable) return push_rid(&E->rej, r) ? -1 : 0;
    E->ahead = 0;
    if (deq_push(&E->q[E->G > 1 ? R->group[r] : 0].pq, r)) return -1;
    E->total_prefill += p;
    E->in_engine++;
    return 1;
}

/* Plan, time and apply one batch starting at `now` (Engine.step); its end in *end_out. */
static int engine_batch_kv(Engine *E, double now, double *end_out);

/* The end of applying a batch: its prompt chunks (after its decodes), and its end time and
 * tokens recorded (engine_batch and engine_batch_kv). */
static int end_batch(Engine *E, Py_ssize_t nch, int64_t prefill_tokens, double end, int64_t num_tokens,
                     double *end_out) {
    if (nch) {
        E->total_prefill -= prefill_tokens;
        if (apply_chunks(E, nch, end)) return -1;
    }
    if (buf_reserve(&E->ends, sizeof(double)) || buf_reserve(&E->tokens, sizeof(int64_t))) return -1;
    ((double *)E->ends.data)[E->batches] = end;
    ((int64_t *)E->tokens.data)[E->batches] = num_tokens;
    E->ends.size += sizeof(double);
    E->tokens.size += sizeof(int64_t);
    E->batches++;
    *end_out = end;
    return 0;
}

static int engine_batch(Engine *E, double now, double *end_out) {
    if (E->kv) return engine_batch_kv(E, now, end_out);
    E->turns++;
    Py_ssize_t nch = 0;
    int64_t n = 0, prefill_tokens;
    if (E->ahead) {  /* planned by engine_rounds at this boundary, nothing admitted since */
        prefill_tokens = E->ahead_prefill;
        n = E->ahead_n;
        nch = E->ahead_nch;
        E->ahead = 0;
    } else {
        prefill_tokens = plan_batch(E, &n, &nch);
    }
    int64_t num_tokens = n + prefill_tokens, demand = E->total_prefill + E->nd;
    if (num_tokens < 1 || num_tokens > E->budget) {
        PyErr_Format(PyExc_RuntimeError, "planned %lld tokens with demand %lld", (long long)num_tokens,
                     (long long)demand);
        return -1;
    }
    int64_t bound = work_bound(E, demand);
    if (bound < 0) return -1;
    if (num_tokens != bound) E->violations++;
    double end = now + E->durations[num_tokens];
    if (E->record) {
        if (buf_reserve(&E->detail, 7 * sizeof(double))) return -1;
        double *d = (double *)(E->detail.data + E->detail.size);
        d[0] = now; d[1] = end; d[2] = (double)prefill_tokens; d[3] = (double)n;
        d[4] = (double)(nch + n); d[5] = (double)demand; d[6] = (double)bound;
        E->detail.size += 7 * sizeof(double);
    }
    E->pfin.size = E->dfin.size = 0;
    for (int o = 0; o < E->norder; o++) {
        int g = E->order[o];
        if (E->n_of[g] && apply_decodes(E, &E->q[g], E->n_of[g], end)) return -1;
    }
    return end_batch(E, nch, prefill_tokens, end, num_tokens, end_out);
}

/* ---- KV memory while applying a batch (Engine._preempt, _allocate) ------------------------- */

static int push_i64(Buf *b, int64_t x) {
    if (buf_reserve(b, sizeof(int64_t))) return -1;
    *(int64_t *)(b->data + b->size) = x;
    b->size += sizeof(int64_t);
    return 0;
}

/* Engine._preempt: free each victim's blocks and put it at the front of the waiting prompts, to
 * recompute its whole sequence (a decoder's next decode token joins the recompute). */
static int kv_preempt(Engine *E, Queue *Q) {
    Req *R = E->R;
    const int64_t *victims = (const int64_t *)E->victims.data;
    Py_ssize_t nv = (Py_ssize_t)(E->victims.size / sizeof(int64_t));
    for (Py_ssize_t k = 0; k < nv; k++) {
        int64_t v = victims[k], held;
        if (R->pl[v] == 0) {   /* a decoder: its true count back in dl, one token to the recompute */
            Py_ssize_t nd = DEQ_N(&Q->dq), j = bisect_stamp(E, DEQ_AT(&Q->dq), nd, E->stamp[v]);
            if (j == nd || DEQ_AT(&Q->dq)[j] != v) {
                PyErr_Format(PyExc_RuntimeError, "preempted request %lld was not decoding", (long long)v);
                return -1;
            }
            int64_t left = dec_left(E, Q, j);
            if (j < Q->head) {
                if (E->cnt) phase_add(E, v, -1);
                Q->head--;
            }
            deq_remove(&Q->dq, j);
            E->nd--;
            E->total_decode -= left;
            held = R->prompts[v] + R->outputs[v] - left;
            R->dl[v] = left - 1;
        } else {
            held = kv_done(E, v);
            Py_ssize_t npq = DEQ_N(&Q->pq), j = 0;
            while (j < npq && DEQ_AT(&Q->pq)[j] != v) j++;
            if (j == npq) {
                PyErr_Format(PyExc_RuntimeError, "preempted request %lld was not prefilling", (long long)v);
                return -1;
            }
            deq_remove(&Q->pq, j);
        }
        E->kv_used -= cdiv(held, E->kv_bs);
        E->npre[v]++;
        if (held > E->peak[v]) E->peak[v] = held;
        E->preemptions++;
        int64_t left = seqlen(E, v);
        E->total_prefill += left - R->pl[v];
        R->pl[v] = left;
        Py_ssize_t at = started_kv(E, DEQ_AT(&Q->pq), DEQ_N(&Q->pq));
        if (at == DEQ_N(&Q->pq) ? deq_push(&Q->pq, v) : deq_insert(&Q->pq, at, v)) return -1;
    }
    E->victims.size = 0;
    return 0;
}

/* Engine._allocate: the blocks of a planned batch (before it is applied); stamps the newly admitted. */
static int kv_allocate(Engine *E, const Queue *Q, int64_t n, Py_ssize_t nch, double now) {
    Req *R = E->R;
    const int64_t bs = E->kv_bs;
    const int reserve = E->kv == KV_RESERVE;
    int64_t used = E->kv_used, waste = 0;
    for (Py_ssize_t c = 0; c < nch; c++) {
        int64_t r = E->chunk_rid[c], len = E->chunk_len[c], done = kv_done(E, r);
        if (done == 0) {
            E->stamp[r] = ++E->stamps;
            if (reserve) used += cdiv(R->prompts[r] + R->outputs[r], bs);
        }
        if (!reserve) {
            used += cdiv(done + len, bs) - cdiv(done, bs);
            if (done < E->peak[r]) {
                int64_t again = MIN(done + len, E->peak[r]) - done;
                E->recomp[r] += again;
                waste += again;
            }
        }
    }
    if (!reserve) used += E->dec_need;   /* the decoders' new blocks, found while planning */
    (void)Q; (void)n;
    if (used > E->kv_usable) {
        PyErr_Format(PyExc_RuntimeError, "%lld KV blocks in use, more than the %lld usable", (long long)used,
                     (long long)E->kv_usable);
        return -1;
    }
    E->kv_used = used;
    E->recomputed += waste;
    if (push_i64(&E->kvb, used) || push_i64(&E->kvw, waste) || buf_reserve(&E->kvs, sizeof(double))) return -1;
    *(double *)(E->kvs.data + E->kvs.size) = now;
    E->kvs.size += sizeof(double);
    return 0;
}

/* Engine.step with KV memory: plan (again, if everyone running was preempted), apply the
 * preemptions, take the blocks, apply the batch. */
static int engine_batch_kv(Engine *E, double now, double *end_out) {
    Queue *Q = &E->q[0];
    E->turns++;
    Py_ssize_t nch = 0;
    int64_t n = 0, prefill_tokens = plan_batch(E, &n, &nch);
    for (int tries = 0; tries < 3 && !E->kv_error && n + prefill_tokens == 0 && E->victims.size; tries++) {
        if (kv_preempt(E, Q)) return -1;
        prefill_tokens = plan_batch(E, &n, &nch);
    }
    if (E->kv_error) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "no running request to preempt");
        return -1;
    }
    int64_t num_tokens = n + prefill_tokens, demand = E->total_prefill + E->nd;
    if (num_tokens < 1 || num_tokens > E->budget) {
        PyErr_Format(PyExc_RuntimeError, "planned %lld tokens with demand %lld", (long long)num_tokens,
                     (long long)demand);
        return -1;
    }
    int64_t bound = work_bound(E, demand);
    if (bound < 0) return -1;
    if (E->kv_limited) E->memory_limited++;
    else if (num_tokens != bound) E->violations++;
    double end = now + E->durations[num_tokens];
    if (E->record) {
        if (buf_reserve(&E->detail, 7 * sizeof(double))) return -1;
        double *d = (double *)(E->detail.data + E->detail.size);
        d[0] = now; d[1] = end; d[2] = (double)prefill_tokens; d[3] = (double)n;
        d[4] = (double)(nch + n); d[5] = (double)demand; d[6] = (double)bound;
        E->detail.size += 7 * sizeof(double);
    }
    if (E->victims.size && kv_preempt(E, Q)) return -1;
    if (kv_allocate(E, Q, n, nch, now)) return -1;
    E->pfin.size = E->dfin.size = 0;
    if (n && apply_decodes(E, Q, n, end)) return -1;
    return end_batch(E, nch, prefill_tokens, end, num_tokens, end_out);
}

/* Decode-only rounds from *nowp while batches start before `lim`.  While the plan is "the n
 * leading decoders" (n >= head) it stays the same batch until an arrival, the horizon, a finish
 * or the cap's bound (no plan depends on decode counts, except the max-weight rule's D while
 * prompts wait), so the batches run as rounds without replanning: each ends at now + t_b and the
 * calendar says who finishes.  With no prompt waiting every plan decodes the min(decoders,
 * most) leading decoders; with prompts waiting the plan is made here, and one that is not
 * decode-only is kept for engine_batch (E->ahead: planned once, not twice).  One queue only.
 * With `collect`, returns after a round that finished
 * someone (1: the caller routes them; their rids in dfin); 0 when done, -1 on error. */
static int engine_rounds(Engine *E, double *nowp, double lim) {
    if (E->G != 1 || E->kv) return 0;
    Queue *Q = &E->q[0];
    double now = *nowp;
    int64_t *dl = E->R->dl;
    const int64_t budget = E->budget;
    while (now < lim && E->in_engine <= E->cap) {
        int64_t n;
        if (DEQ_N(&Q->pq) == 0) {
            n = MIN(E->nd, E->most);
        } else {
            if (E->load_rule != NO_LOAD_RULE) break;
            Py_ssize_t k = 0;
            int64_t p = plan_batch(E, &n, &k);
            if (p || k) {  /* not decode-only: engine_batch runs this plan */
                E->ahead = 1;
                E->ahead_prefill = p;
                E->ahead_n = n;
                E->ahead_nch = k;
                break;
            }
        }
        if (n == 0 || n < Q->head) break;
        int64_t *dq = DEQ_AT(&Q->dq);
        for (; Q->head < n; Q->head++) {
            int64_t r = dq[Q->head], key = Q->rounds - dl[r];
            dl[r] = key;
            if (cal_push(&Q->cal, Q->rounds, key, r)) return -1;
        }
        int64_t demand = E->total_prefill + E->nd, bound = MIN(budget, demand);
        /* The same batch round after round (up to 4,096 at a time), before `lim`: end = now + t_b
         * each.  A round with calendar entries settles them here; if nobody finished (only
         * delayed entries re-filed) the batch stays the same. */
        const int64_t mask = Q->cal.mask, *slot = Q->cal.slot;
        int64_t far = Q->cal.far.n ? Q->cal.far.a[0].key : INT64_MAX;
        const double duration = E->durations[n];
        if (buf_reserve(&E->ends, 4096 * sizeof(double)) || buf_reserve(&E->tokens, 4096 * sizeof(int64_t))
            || (E->record && buf_reserve(&E->detail, 4096 * 7 * sizeof(double))))
            return -1;
        double *ends = (double *)E->ends.data + E->batches;
        int64_t *toks = (int64_t *)E->tokens.data + E->batches;
        double *d = E->record ? (double *)(E->detail.data + E->detail.size) : NULL;
        size_t m = 0;
        Py_ssize_t gone = 0;
        /* perf: the round counter in a local (a store through Q each round cannot stay in a
         * register: toks, an int64_t array, may alias it) */
        int64_t rounds = Q->rounds;
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
                Q->rounds = rounds;
                Py_ssize_t nfin = cal_take(&Q->cal, rounds, &E->fin);
                if (nfin < 0) return -1;
                E->pfin.size = E->dfin.size = 0;
                gone = settle(E, Q, nfin, now);
                if (gone < 0) return -1;
                if (gone) break;  /* fewer decoders: a new plan */
                far = Q->cal.far.n ? Q->cal.far.a[0].key : INT64_MAX;
            }
        }
        Q->rounds = rounds;
        E->violations += (int64_t)m * (n != bound);
        E->total_decode -= (int64_t)m * n;
        E->ends.size += m * sizeof(double);
        E->tokens.size += m * sizeof(int64_t);
        if (d) E->detail.size += m * 7 * sizeof(double);
        E->batches += m;
        if (report(E->rep, m, now)) return -1;
        if (gone && E->collect) {
            *nowp = now;
            return 1;
        }
    }
    *nowp = now;
    return 0;
}

/* Set up an engine: its policy from a plan encoding and its parameters; G queues.  Returns -1
 * with an exception set on bad input. */
static int engine_init(Engine *E, Req *R, Reporter *rep, const int64_t *plan, Py_ssize_t plan_words,
                       const double *durations, Py_ssize_t n_durations, int64_t budget, int64_t cap,
                       int splits_prompts, const int64_t *useful, Py_ssize_t n_useful, int has_useful,
                       const int64_t *breaks, Py_ssize_t n_breaks, int G, int record, int collect,
                       int64_t most_requests, int64_t longest, int64_t ring) {
    memset(E, 0, sizeof(*E));
    E->R = R;
    E->rep = rep;
    if (budget < 1 || cap < 1 || G < 1 || n_durations != budget + 1) {
        PyErr_SetString(PyExc_ValueError, "bad engine parameters");
        return -1;
    }
    if (plan_words < 2 || plan[0] < NO_LOAD_RULE || plan[0] > MAX_WEIGHT_LOAD || plan[1] < 1 || plan[1] > MAX_STEPS
        || plan_words != 2 + 6 * plan[1] || (plan[0] != NO_LOAD_RULE && G != 1)) {
        PyErr_SetString(PyExc_ValueError, "bad plan encoding");
        return -1;
    }
    E->load_rule = (int)plan[0];
    E->nsteps = (int)plan[1];
    for (int k = 0; k < E->nsteps; k++) {
        const int64_t *w = plan + 2 + 6 * k;
        PlanStep st = {w[0], w[1], w[2], w[3], w[4], w[5]};
        if (st.code < DECODES || st.code > WAITING || st.max_chunk < 1 || st.max_running < 1 || st.alone_chunk < 1) {
            PyErr_SetString(PyExc_ValueError, "bad plan step");
            return -1;
        }
        E->steps[k] = st;
    }
    E->budget = budget;
    E->cap = cap;
    E->most = MIN(budget, cap);
    E->splits_prompts = splits_prompts;
    E->durations = durations;
    E->useful = has_useful ? useful : NULL;
    E->n_useful = n_useful;
    E->breaks = breaks;
    E->n_breaks = n_breaks;
    E->G = G;
    E->record = record;
    E->collect = collect;
    E->ends.python = E->tokens.python = E->detail.python = 1;
    size_t scratch = (size_t)(budget < most_requests ? budget : most_requests) + 1;  /* one chunk per token and request */
    E->chunk_rid = malloc(scratch * sizeof(int64_t));
    E->chunk_len = malloc(scratch * sizeof(int64_t));
    E->n_of = calloc((size_t)G, sizeof(int64_t));
    E->done_of = calloc((size_t)G, sizeof(int64_t));
    E->order = calloc((size_t)G, sizeof(int));
    E->key = calloc((size_t)G, sizeof(double));
    E->q = calloc((size_t)G, sizeof(Queue));
    if (!E->chunk_rid || !E->chunk_len || !E->n_of || !E->done_of || !E->order || !E->key || !E->q) {
        PyErr_NoMemory();
        return -1;
    }
    for (int g = 0; g < G; g++)
        if (cal_init(&E->q[g].cal, longest, ring)) return -1;
    return 0;
}

static void engine_free(Engine *E) {
    if (E->q) {
        for (int g = 0; g < E->G; g++) {
            Queue *Q = &E->q[g];
            free(Q->pq.a); free(Q->dq.a);
            free(Q->cal.slot); free(Q->cal.node_rid); free(Q->cal.node_next); free(Q->cal.far.a);
        }
    }
    free(E->q); free(E->chunk_rid); free(E->chunk_len); free(E->n_of); free(E->done_of); free(E->order);
    free(E->key); free(E->tmp);
    buf_free(&E->fin); buf_free(&E->pfin); buf_free(&E->dfin); buf_free(&E->rej);
    buf_free(&E->ends); buf_free(&E->tokens); buf_free(&E->detail);
    free(E->cnt);
    buf_free(&E->victims); buf_free(&E->kvb); buf_free(&E->kvw); buf_free(&E->kvs);
}

/* Leave true decode counts in decode_left, as reference stepping would. */
static void engine_settle_counts(Engine *E) {
    int64_t *dl = E->R->dl;
    for (int g = 0; g < E->G; g++) {
        Queue *Q = &E->q[g];
        const int64_t *dq = DEQ_AT(&Q->dq);
        for (Py_ssize_t j = 0; j < DEQ_N(&Q->dq); j++) {
            int64_t r = dq[j];
            dl[r] = j < Q->head ? dl[r] - Q->rounds : -dl[r];
        }
    }
}

/* ---- one engine fed by an array of arrivals ---------------------------------------------- */

static int buffer_ok(Py_buffer *b, const char *name, Py_ssize_t items, Py_ssize_t itemsize) {
    if (b->len != items * itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, expected %zd", name, b->len, items * itemsize);
        return 0;
    }
    return 1;
}

static int64_t longest_of(const int64_t *a, Py_ssize_t n) {
    int64_t m = 0;
    for (Py_ssize_t k = 0; k < n; k++)
        if (a[k] > m) m = a[k];
    return m;
}

PyDoc_STRVAR(run_doc,
"run(arrivals, prompts, outputs, durations, prefill_left, decode_left, first, finish, prefilling,\n"
"    decoding, rejected, plan, useful, breaks, budget, cap, has_useful, splits_prompts, horizon,\n"
"    record, progress, ring, start_now, carried, n_pre, n_dec, stop, kv_state, kv_blocks, block_size,\n"
"    kv_policy)\n"
"--\n\n"
"One engine on the compiled core (see llmqueue.core.fastcore, which calls it).  plan is the policy's\n"
"Plan.encode() as int64 (llmqueue.schedulers.plan); useful and breaks are the max-weight load\n"
"rule's candidate loads (int64; has_useful false: every load is useful).  Returns (now, i,\n"
"pre_start, pre_end, dec_start, num_decoding, num_rejected, in_engine, violations, total_prefill,\n"
"ends, tokens, detail, planned) where ends/tokens/detail are bytearrays of float64/int64/7xfloat64\n"
"per batch and planned counts the batches planned in full (the rest ran as decode-only rounds).\n"
"ring caps the calendar's ring of per-round lists (entries further ahead go to a heap).  A resumed\n"
"run starts at start_now with requests [0, carried) in the engine (prefill_left/decode_left/first\n"
"set; their queues in prefilling[:n_pre] and decoding[:n_dec]); stop = 1 returns once every\n"
"arrival is admitted, at the boundary where the next ones would be (streaming); stop = 2 returns\n"
"after the first batch that finishes a request (stepping, llmqueue.core.stepper).  kv_policy 0: no\n"
"KV memory; 1 recompute, 2 reserve (llmqueue.model.kv): kv_state is 5 x n int64 (per request its\n"
"stamp, preemptions, peak, recomputed tokens, planning mark; zeros), for a whole run from empty; the\n"
"result's last item is (blocks per batch, recomputed per batch, start per batch, memory-limited\n"
"batches, preemptions, blocks in use at the end).");

static PyObject *run(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer b[15];
    int has_useful, splits_prompts, record, stop, kv_policy;
    long long budget, cap, ring, kv_blocks, kv_bs;
    double horizon, start_now;
    PyObject *progress;
    Py_ssize_t carried, n_pre, n_dec;
    memset(b, 0, sizeof(b));
    if (!PyArg_ParseTuple(args, "y*y*y*y*w*w*w*w*w*w*w*y*y*y*LLppdpOLdnnniw*LLi:run",
                          &b[0], &b[1], &b[2], &b[3], &b[4], &b[5], &b[6], &b[7], &b[8], &b[9], &b[10],
                          &b[11], &b[12], &b[13], &budget, &cap, &has_useful, &splits_prompts, &horizon,
                          &record, &progress, &ring, &start_now, &carried, &n_pre, &n_dec, &stop,
                          &b[14], &kv_blocks, &kv_bs, &kv_policy))
        return NULL;
    PyObject *result = NULL;
    Engine E;
    Reporter P = {progress, 0, 0, 0, 0};
    memset(&E, 0, sizeof(E));
    Py_ssize_t n = b[0].len / (Py_ssize_t)sizeof(double);
    if (!buffer_ok(&b[0], "arrivals", n, 8) || !buffer_ok(&b[1], "prompts", n, 8) || !buffer_ok(&b[2], "outputs", n, 8)
        || !buffer_ok(&b[4], "prefill_left", n, 8) || !buffer_ok(&b[5], "decode_left", n, 8)
        || !buffer_ok(&b[6], "first", n, 8) || !buffer_ok(&b[7], "finish", n, 8) || !buffer_ok(&b[8], "prefilling", n, 8)
        || b[9].len < n * 8 || !buffer_ok(&b[10], "rejected", n, 8) || b[11].len % 8 || b[12].len % 8 || b[13].len % 8)
        goto done;
    if (carried < 0 || carried > n || n_pre < 0 || n_dec < 0 || n_pre + n_dec > carried) {
        PyErr_SetString(PyExc_ValueError, "bad carried requests");
        goto done;
    }
    if (progress != Py_None && !PyCallable_Check(progress)) {
        PyErr_SetString(PyExc_TypeError, "progress must be callable or None");
        goto done;
    }
    Req R = {b[4].buf, b[5].buf, b[1].buf, b[2].buf, NULL, b[6].buf, b[7].buf};
    if (engine_init(&E, &R, &P, b[11].buf, b[11].len / 8, b[3].buf, b[3].len / 8, budget, cap, splits_prompts,
                    b[12].buf, b[12].len / 8, has_useful, b[13].buf, b[13].len / 8, 1, record, stop == 2, n,
                    longest_of(R.outputs, n), ring))
        goto done;
    if (kv_policy != KV_NONE) {  /* KV memory: whole runs from empty (no carried requests, no stepping) */
        if (kv_policy < KV_NONE || kv_policy > KV_RESERVE || kv_blocks < 2 || kv_bs < 1 || carried || stop
            || !buffer_ok(&b[14], "kv per-request state", 5 * n, 8)) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad KV parameters");
            goto done;
        }
        int64_t *k = b[14].buf;
        E.kv = kv_policy;
        E.kv_usable = kv_blocks - 1;
        E.kv_bs = kv_bs;
        E.stamp = k; E.npre = k + n; E.peak = k + 2 * n; E.recomp = k + 3 * n; E.mark = k + 4 * n;
        E.mark_base = 2;
        if (kv_policy == KV_RECOMPUTE && !(E.cnt = calloc((size_t)kv_bs, sizeof(int64_t)))) {
            PyErr_NoMemory();
            goto done;
        }
    }
    const double *arrivals = b[0].buf;
    int64_t *pl = R.pl, *dl = R.dl, *prefilling = b[8].buf, *decoding = b[9].buf;
    /* Requests carried in: the prompts queue; the decoders (true counts) go behind an empty head. */
    Queue *Q = &E.q[0];
    for (Py_ssize_t q = 0; q < n_pre; q++) {
        if (deq_push(&Q->pq, prefilling[q])) goto done;
        E.total_prefill += pl[prefilling[q]];
    }
    for (Py_ssize_t j = 0; j < n_dec; j++) {
        int64_t r = decoding[j];
        if (deq_push(&Q->dq, r)) goto done;
        E.total_decode += dl[r];
        dl[r] = -dl[r];
    }
    E.in_engine = n_pre + n_dec;
    E.nd = n_dec;
    double now = start_now;
    Py_ssize_t i = carried;
    for (;;) {
        /* Admit every arrival up to this batch boundary (Engine.admit). */
        while (i < n && arrivals[i] <= now)
            if (engine_admit(&E, i++) < 0) goto done;
        P.admitted = i;
        if (stop == 1 && i >= n) break;  /* streaming: the caller brings the next arrivals */
        if (!E.in_engine) {
            if (i >= n || arrivals[i] > horizon) break;
            now = arrivals[i];
            continue;
        }
        if (now >= horizon) break;
        if (engine_batch(&E, now, &now) || report(&P, 1, now)) goto done;
        /* stepping: a request finished (at the horizon the loop's top admits and stops, as always) */
        if (stop == 2 && (E.pfin.size || E.dfin.size) && now < horizon) break;
        double lim = horizon;
        if (i < n && arrivals[i] < lim) lim = arrivals[i];
        int r = engine_rounds(&E, &now, lim);
        if (r < 0) goto done;
        if (r == 1 && now < horizon) break;
    }
    engine_settle_counts(&E);
    Py_ssize_t npre = DEQ_N(&Q->pq), nd = DEQ_N(&Q->dq), nrej = (Py_ssize_t)(E.rej.size / sizeof(int64_t));
    if (npre) memcpy(prefilling, DEQ_AT(&Q->pq), (size_t)npre * sizeof(int64_t));
    if (nd) memcpy(decoding, DEQ_AT(&Q->dq), (size_t)nd * sizeof(int64_t));
    if (nrej) memcpy(b[10].buf, E.rej.data, E.rej.size);
    PyObject *ends = buf_take(&E.ends), *tokens = buf_take(&E.tokens);
    PyObject *detail = record ? buf_take(&E.detail) : (Py_INCREF(Py_None), Py_None);
    PyObject *kvb = PyByteArray_FromStringAndSize(E.kvb.data, (Py_ssize_t)E.kvb.size);
    PyObject *kvw = PyByteArray_FromStringAndSize(E.kvw.data, (Py_ssize_t)E.kvw.size);
    PyObject *kvs = PyByteArray_FromStringAndSize(E.kvs.data, (Py_ssize_t)E.kvs.size);
    if (ends && tokens && detail && kvb && kvw && kvs)
        result = Py_BuildValue("dnnnnnnLLLOOOn(OOOLLL)", now, i, (Py_ssize_t)0, npre, (Py_ssize_t)0, nd, nrej,
                               (long long)E.in_engine, (long long)E.violations, (long long)E.total_prefill, ends,
                               tokens, detail, (Py_ssize_t)E.turns, kvb, kvw, kvs, (long long)E.memory_limited,
                               (long long)E.preemptions, (long long)E.kv_used);
    Py_XDECREF(ends);
    Py_XDECREF(tokens);
    Py_XDECREF(detail);
    Py_XDECREF(kvb);
    Py_XDECREF(kvw);
    Py_XDECREF(kvs);
done:
    engine_free(&E);
    for (int k = 0; k < 15; k++)
        if (b[k].obj) PyBuffer_Release(&b[k]);
    return result;
}

/* ---- a network of engines and delay stations (network/sim.py) ---------------------------- */

enum { ARRIVAL = 0, BATCH_END = 1, DELAY_END = 2 };

/* An event: (time, seq) orders the heap; seq breaks ties in insertion order, as in network/sim.py. */
typedef struct { double time; int64_t seq; int64_t kind, a, b; } Event;
#define EVENT_LESS(x, y) ((x)->time < (y)->time || ((x)->time == (y)->time && (x)->seq < (y)->seq))
DEFINE_HEAP(Events, Event, EVENT_LESS)

/* Where one branch of a job is: its segment, the next visit, and the join it reports to. */
typedef struct { int64_t job, seg, pos, join; } Token;
typedef struct { int64_t remaining, seg, parent; } Join;

typedef struct {
    int J;
    Engine *E;
    int *busy;
    /* jobs' routes, flattened by network/sim.py: visits, segments, jobs class by class */
    const int64_t *v_engine, *v_prompt, *v_output, *v_buffer, *v_group;
    const double *v_delay;
    const int64_t *seg_vstart, *seg_vcount, *seg_bstart, *seg_bcount, *seg_children, *seg_join;
    const int64_t *job_root, *class_start;
    const double *job_entry;
    int K;
    Py_ssize_t S, n_jobs;
    /* per sub-request (rid), written here */
    int64_t *sub_visit, *sub_job, *sub_token, *sub_prompt, *sub_output, *sub_group, *sub_rejected;
    double *sub_arrival;
    Py_ssize_t nsub;
    /* per job (in order of arrival), written here */
    int64_t *job_src, *job_rejected;
    double *job_exit;
    Py_ssize_t njobs;
    int64_t *counts;   /* requests per buffer in the network (max-pressure's Z_b) */
    Token *tok; Py_ssize_t ntok, tok_cap;
    Join *joins; Py_ssize_t njoin, join_cap;
    Events events;
    int64_t seq;
    int touched;       /* an engine other than the one running ahead got a request */
    int running;       /* the engine running ahead, or -1 */
    double horizon;
} Net;

static int ev_push(Net *N, double time, int64_t kind, int64_t a, int64_t b) {
    return Events_push(&N->events, (Event){time, N->seq++, kind, a, b});
}

static int64_t new_token(Net *N, int64_t job, int64_t seg, int64_t join) {
    if (N->ntok == N->tok_cap) {
        Py_ssize_t cap = N->tok_cap ? 2 * N->tok_cap : 1024;
        Token *p = realloc(N->tok, (size_t)cap * sizeof(Token));
        if (!p) { PyErr_NoMemory(); return -1; }
        N->tok = p;
        N->tok_cap = cap;
    }
    N->tok[N->ntok] = (Token){job, seg, 0, join};
    return N->ntok++;
}

static int64_t new_join(Net *N, int64_t remaining, int64_t seg, int64_t parent) {
    if (N->njoin == N->join_cap) {
        Py_ssize_t cap = N->join_cap ? 2 * N->join_cap : 1024;
        Join *p = realloc(N->joins, (size_t)cap * sizeof(Join));
        if (!p) { PyErr_NoMemory(); return -1; }
        N->joins = p;
        N->join_cap = cap;
    }
    N->joins[N->njoin] = (Join){remaining, seg, parent};
    return N->njoin++;
}

/* _Simulation.advance: move a branch on from where it is: to its next visit (an engine, where a
 * sub-request is admitted, or a delay station), a fork, its join, or out. */
static int advance(Net *N, int64_t t, double now) {
    for (;;) {
        int64_t job = N->tok[t].job, seg = N->tok[t].seg;
        if (N->job_rejected[job]) return 0;
        if (N->tok[t].pos < N->seg_vcount[seg]) {
            int64_t v = N->seg_vstart[seg] + N->tok[t].pos++;
            int64_t e = N->v_engine[v];
            if (e < 0) return ev_push(N, now + N->v_delay[v], DELAY_END, t, 0);
            if (N->nsub >= N->S) {
                PyErr_SetString(PyExc_RuntimeError, "more sub-requests than visits");
                return -1;
            }
            int64_t s = N->nsub++;
            N->sub_visit[s] = v;
            N->sub_job[s] = job;
            N->sub_token[s] = t;
            N->sub_arrival[s] = now;
            N->sub_prompt[s] = N->v_prompt[v];
            N->sub_output[s] = N->v_output[v];
            N->sub_group[s] = N->v_group[v];
            if (e != N->running) N->touched = 1;
            int ok = engine_admit(&N->E[e], s);
            if (ok < 0) return -1;
            if (ok) {
                N->counts[N->v_buffer[v]]++;
            } else {
                N->job_rejected[job] = 1;
                N->sub_rejected[s] = 1;
            }
            return 0;
        }
        if (N->seg_bcount[seg]) {
            int64_t jn = new_join(N, N->seg_bcount[seg], N->seg_join[seg], N->tok[t].join);
            if (jn < 0) return -1;
            for (int64_t k = 0; k < N->seg_bcount[seg]; k++) {
                int64_t t2 = new_token(N, job, N->seg_children[N->seg_bstart[seg] + k], jn);
                if (t2 < 0 || advance(N, t2, now)) return -1;
            }
            return 0;
        }
        int64_t jn = N->tok[t].join;
        if (jn < 0) {
            N->job_exit[job] = now;
            return 0;
        }
        if (--N->joins[jn].remaining) return 0;
        N->tok[t].seg = N->joins[jn].seg;
        N->tok[t].pos = 0;
        N->tok[t].join = N->joins[jn].parent;
    }
}

/* A batch end of engine j: route what it finished (its prefill completions, then its decoders,
 * in Engine.step's order). */
static int route_finished(Net *N, int j, double now) {
    Engine *E = &N->E[j];
    Buf *lists[2] = {&E->pfin, &E->dfin};
    for (int l = 0; l < 2; l++) {
        Py_ssize_t n = (Py_ssize_t)(lists[l]->size / sizeof(int64_t));
        for (Py_ssize_t k = 0; k < n; k++) {
            int64_t s = ((int64_t *)lists[l]->data)[k];
            N->counts[N->v_buffer[N->sub_visit[s]]]--;
            if (advance(N, N->sub_token[s], now)) return -1;
        }
        lists[l]->size = 0;
    }
    return 0;
}

static inline double next_time(const Net *N) {
    return N->events.n ? N->events.a[0].time : INFINITY;
}

/* Start engine j's batch at `now` (all events at `now` are handled).  With `ahead` (no other
 * engine starts at `now`), while its batch ends before every other event it is the only thing
 * that happens: handle that batch end here, as the event loop would, and go on (decode-only
 * rounds included) until a batch end that routes a request to another engine, or that is not
 * the earliest event: that one is pushed as the BATCH_END event.  `*last` is the time of the
 * last batch end handled here.  Returns 1 when it stopped after handling a batch end at *at
 * whose routing needs the other engines' start phase there, 0 otherwise, -1 on error. */
static int start(Net *N, Reporter *P, int j, double now, int ahead, double *last, double *at) {
    Engine *E = &N->E[j];
    N->busy[j] = 1;
    for (;;) {
        double end;
        if (engine_batch(E, now, &end) || report(P, 1, end)) return -1;
        for (;;) {
            if (!ahead || !(end < next_time(N)) || end > N->horizon) return ev_push(N, end, BATCH_END, j, 0);
            /* this batch end is the earliest event: handle it here */
            *last = end;
            N->running = j;
            N->touched = 0;
            int rc = route_finished(N, j, end);
            N->running = -1;
            if (rc) return -1;
            now = end;
            if (N->touched || !(now < next_time(N))) {  /* others act at `now` too: back to the loop */
                N->busy[j] = 0;
                *at = now;
                return 1;
            }
            if (!(now < N->horizon) || !E->in_engine) {
                N->busy[j] = 0;
                return 0;
            }
            double lim = next_time(N);
            if (N->horizon < lim) lim = N->horizon;
            size_t before = E->batches;
            int r = engine_rounds(E, &now, lim);
            if (r < 0) return -1;
            if (r == 1 || E->batches == before) {
                if (r == 1) end = now;       /* a round that finished someone: its end is handled above */
                else break;                  /* no rounds: plan the next batch at `now` */
                continue;
            }
            if (!(now < lim)) return ev_push(N, now, BATCH_END, j, 0);  /* the last round's end is an event */
            *last = now;  /* rounds stopped early (the cap's bound): their last end is handled here */
            break;
        }
    }
}

/* The arrays run_network reads are consistent (network/fast.py builds them; a mistake there must
 * be an exception, not a stray read).  b: the buffers in the order GET took them. */
static int check_network(const Net *N, const Py_buffer *b, Py_ssize_t n_visits, Py_ssize_t n_counts) {
    Py_ssize_t nseg = b[6].len / 8, nchild = b[10].len / 8;
    const char *bad = NULL;
    for (int k = 1; k < 6 && !bad; k++)
        if (b[k].len / 8 != n_visits) bad = "visit arrays of different lengths";
    for (int k = 7; k < 12 && !bad; k++)
        if (k != 10 && b[k].len / 8 != nseg) bad = "segment arrays of different lengths";
    if (!bad && (b[13].len / 8 != N->n_jobs || N->K < 0 || N->class_start[0] != 0 || N->class_start[N->K] != N->n_jobs))
        bad = "job arrays";
    for (int k = 0; k < N->K && !bad; k++)
        if (N->class_start[k] > N->class_start[k + 1]) bad = "class starts";
    for (int k = 15; k < 25 && !bad; k++)
        if (b[k].len / 8 < N->S) bad = "sub-request arrays";
    for (int k = 25; k < 27 && !bad; k++)
        if (b[k].len / 8 < N->n_jobs) bad = "job outputs";
    if (!bad && b[27].len / 8 < N->n_jobs) bad = "job outputs";
    for (Py_ssize_t v = 0; v < n_visits && !bad; v++) {
        int64_t e = N->v_engine[v];
        if (e >= N->J || e < -1 || (e >= 0 && (N->v_buffer[v] < 0 || N->v_buffer[v] >= n_counts || N->v_group[v] < 0
                                                || N->v_group[v] >= N->E[e].G || N->v_prompt[v] < 1 || N->v_output[v] < 0)))
            bad = "a visit";
    }
    for (Py_ssize_t g = 0; g < nseg && !bad; g++)
        if (N->seg_vstart[g] < 0 || N->seg_vcount[g] < 0 || N->seg_vstart[g] + N->seg_vcount[g] > n_visits
            || N->seg_bcount[g] < 0 || N->seg_bstart[g] < 0 || N->seg_bstart[g] + N->seg_bcount[g] > nchild
            || N->seg_join[g] >= nseg || (N->seg_bcount[g] && N->seg_join[g] < 0))
            bad = "a segment";
    for (Py_ssize_t c = 0; c < nchild && !bad; c++)
        if (N->seg_children[c] < 0 || N->seg_children[c] >= nseg) bad = "a branch";
    for (Py_ssize_t j = 0; j < N->n_jobs && !bad; j++)
        if (N->job_root[j] < 0 || N->job_root[j] >= nseg) bad = "a job's root";
    for (int j = 0; j < N->J && !bad; j++) {
        const Engine *E = &N->E[j];
        if (E->order_kind != ORDER_STATIC && E->order_kind != ORDER_PRESSURE) bad = "a group order";
        if (E->order_kind == ORDER_PRESSURE)
            for (int g = 0; g < E->G && !bad; g++)
                if (E->buffer[g] < 0 || E->buffer[g] >= n_counts || E->ds_start[g] > E->ds_start[g + 1]) bad = "a group";
    }
    if (bad) {
        PyErr_Format(PyExc_ValueError, "run_network: inconsistent %s", bad);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(run_network_doc,
"run_network(engines, visits, segments, jobs, subs, job_out, counts, horizon, ring, progress)\n"
"--\n\n"
"A network of engines and delay stations on the compiled core (see llmqueue.network.sim, which\n"
"calls it and documents the arrays).  Returns (now, sub-requests, jobs, [(ends, tokens, detail,\n"
"violations, planned, in_engine, total_prefill) per engine]).");

static PyObject *run_network(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *engines, *visits, *segments, *jobs, *subs, *job_out, *progress;
    Py_buffer counts_b;
    double horizon;
    long long ring;
    memset(&counts_b, 0, sizeof(counts_b));
    if (!PyArg_ParseTuple(args, "O!O!O!O!O!O!w*dLO:run_network", &PyTuple_Type, &engines, &PyTuple_Type, &visits,
                          &PyTuple_Type, &segments, &PyTuple_Type, &jobs, &PyTuple_Type, &subs, &PyTuple_Type,
                          &job_out, &counts_b, &horizon, &ring, &progress))
        return NULL;
    PyObject *result = NULL;
    Net N;
    memset(&N, 0, sizeof(N));
    N.running = -1;
    N.horizon = horizon;
    Reporter P = {progress, 1, 0, 0, 0};
    enum { NB = 64 };
    Py_buffer b[NB];
    int nb = 0;
    memset(b, 0, sizeof(b));
#define GET(tuple, k, dst, type, writable)                                                              \
    do {                                                                                                \
        if (nb >= NB || PyObject_GetBuffer(PyTuple_GET_ITEM(tuple, k), &b[nb],                          \
                                           (writable) ? PyBUF_WRITABLE : PyBUF_SIMPLE)) goto done;      \
        dst = (type)b[nb++].buf;                                                                        \
    } while (0)
    if (PyTuple_GET_SIZE(visits) != 6 || PyTuple_GET_SIZE(segments) != 6 || PyTuple_GET_SIZE(jobs) != 3
        || PyTuple_GET_SIZE(subs) != 10 || PyTuple_GET_SIZE(job_out) != 3) {
        PyErr_SetString(PyExc_ValueError, "bad network arrays");
        goto done;
    }
    if (progress != Py_None && !PyCallable_Check(progress)) {
        PyErr_SetString(PyExc_TypeError, "progress must be callable or None");
        goto done;
    }
    GET(visits, 0, N.v_engine, const int64_t *, 0);
    Py_ssize_t n_visits = b[nb - 1].len / 8;
    N.S = n_visits;  /* (a bound: the engine visits are fewer) */
    GET(visits, 1, N.v_prompt, const int64_t *, 0);
    GET(visits, 2, N.v_output, const int64_t *, 0);
    GET(visits, 3, N.v_buffer, const int64_t *, 0);
    GET(visits, 4, N.v_group, const int64_t *, 0);
    GET(visits, 5, N.v_delay, const double *, 0);
    GET(segments, 0, N.seg_vstart, const int64_t *, 0);
    GET(segments, 1, N.seg_vcount, const int64_t *, 0);
    GET(segments, 2, N.seg_bstart, const int64_t *, 0);
    GET(segments, 3, N.seg_bcount, const int64_t *, 0);
    GET(segments, 4, N.seg_children, const int64_t *, 0);
    GET(segments, 5, N.seg_join, const int64_t *, 0);
    GET(jobs, 0, N.job_root, const int64_t *, 0);
    N.n_jobs = b[nb - 1].len / 8;
    GET(jobs, 1, N.job_entry, const double *, 0);
    GET(jobs, 2, N.class_start, const int64_t *, 0);
    N.K = (int)(b[nb - 1].len / 8) - 1;
    int64_t *pl, *dl;
    double *first, *finish;
    GET(subs, 0, N.sub_visit, int64_t *, 1);
    if (b[nb - 1].len / 8 < N.S) N.S = b[nb - 1].len / 8;
    GET(subs, 1, N.sub_job, int64_t *, 1);
    GET(subs, 2, N.sub_token, int64_t *, 1);
    GET(subs, 3, N.sub_prompt, int64_t *, 1);
    GET(subs, 4, N.sub_output, int64_t *, 1);
    GET(subs, 5, N.sub_group, int64_t *, 1);
    GET(subs, 6, N.sub_rejected, int64_t *, 1);
    GET(subs, 7, N.sub_arrival, double *, 1);
    GET(subs, 8, first, double *, 1);
    GET(subs, 9, finish, double *, 1);
    GET(job_out, 0, N.job_src, int64_t *, 1);
    GET(job_out, 1, N.job_rejected, int64_t *, 1);
    GET(job_out, 2, N.job_exit, double *, 1);
    N.counts = counts_b.buf;
    pl = malloc((size_t)(N.S + 1) * sizeof(int64_t));
    dl = malloc((size_t)(N.S + 1) * sizeof(int64_t));
    N.J = (int)PyTuple_GET_SIZE(engines);
    N.E = calloc((size_t)N.J + 1, sizeof(Engine));
    N.busy = calloc((size_t)N.J + 1, sizeof(int));
    if (!pl || !dl || !N.E || !N.busy) {
        PyErr_NoMemory();
        goto done;
    }
    Req R = {pl, dl, N.sub_prompt, N.sub_output, N.sub_group, first, finish};
    int64_t longest = longest_of(N.v_output, n_visits);
    for (int j = 0; j < N.J; j++) {
        PyObject *spec = PyTuple_GET_ITEM(engines, j);
        if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 15) {
            PyErr_SetString(PyExc_ValueError, "bad engine spec");
            goto done;
        }
        const int64_t *plan, *useful, *breaks;
        const double *durations;
        int first_b = nb;
        GET(spec, 0, plan, const int64_t *, 0);
        GET(spec, 1, durations, const double *, 0);
        GET(spec, 2, useful, const int64_t *, 0);
        GET(spec, 3, breaks, const int64_t *, 0);
        Engine *E = &N.E[j];
        long long budget = PyLong_AsLongLong(PyTuple_GET_ITEM(spec, 4));
        long long cap = PyLong_AsLongLong(PyTuple_GET_ITEM(spec, 5));
        int splits = PyObject_IsTrue(PyTuple_GET_ITEM(spec, 6)), has_useful = PyObject_IsTrue(PyTuple_GET_ITEM(spec, 7));
        long G = PyLong_AsLong(PyTuple_GET_ITEM(spec, 8)), order_kind = PyLong_AsLong(PyTuple_GET_ITEM(spec, 9));
        if (PyErr_Occurred()) goto done;
        if (engine_init(E, &R, &P, plan, b[first_b].len / 8, durations, b[first_b + 1].len / 8, budget, cap, splits,
                        useful, b[first_b + 2].len / 8, has_useful, breaks, b[first_b + 3].len / 8, (int)G, 1, 1, N.S,
                        longest, ring))
            goto done;
        E->order_kind = (int)order_kind;
        GET(spec, 10, E->buffer, const int64_t *, 0);
        GET(spec, 11, E->ds_start, const int64_t *, 0);
        GET(spec, 12, E->ds_buf, const int64_t *, 0);
        GET(spec, 13, E->ds_p, const double *, 0);
        GET(spec, 14, E->inv_tokens, const double *, 0);
        E->counts = N.counts;
        if (b[nb - 5].len / 8 < G || b[nb - 4].len / 8 < G + 1 || b[nb - 1].len / 8 < G
            || b[nb - 3].len / 8 < E->ds_start[G] || b[nb - 2].len / 8 < E->ds_start[G]) {
            PyErr_SetString(PyExc_ValueError, "run_network: inconsistent group arrays");
            goto done;
        }
        for (int64_t k = 0; k < E->ds_start[G]; k++)
            if (E->ds_buf[k] < 0 || E->ds_buf[k] >= (int64_t)(counts_b.len / 8)) {
                PyErr_SetString(PyExc_ValueError, "run_network: inconsistent downstream buffers");
                goto done;
            }
    }
#undef GET
    if (check_network(&N, b, n_visits, (Py_ssize_t)(counts_b.len / 8))) goto done;
    for (int k = 0; k < N.K; k++)
        if (N.class_start[k] < N.class_start[k + 1] && ev_push(&N, N.job_entry[N.class_start[k]], ARRIVAL, k, 0))
            goto done;
    double now = 0.0, last = 0.0, at;
    int *starting = calloc((size_t)N.J + 1, sizeof(int));
    if (!starting) { PyErr_NoMemory(); goto done; }
    int failed = 0;
    while (N.events.n && N.events.a[0].time <= horizon) {
        now = N.events.a[0].time;
        last = now;
        while (N.events.n && N.events.a[0].time == now) {
            Event ev = Events_pop(&N.events);
            if (ev.kind == ARRIVAL) {
                int64_t k = ev.a, i = ev.b, src = N.class_start[k] + i;
                int64_t job = N.njobs++;
                N.job_src[job] = src;
                int64_t t = new_token(&N, job, N.job_root[src], -1);
                if (t < 0 || advance(&N, t, now)) { failed = 1; break; }
                if (src + 1 < N.class_start[k + 1] && ev_push(&N, N.job_entry[src + 1], ARRIVAL, k, i + 1)) {
                    failed = 1;
                    break;
                }
            } else if (ev.kind == BATCH_END) {
                N.busy[ev.a] = 0;
                if (route_finished(&N, (int)ev.a, now)) { failed = 1; break; }
            } else if (advance(&N, ev.a, now)) {
                failed = 1;
                break;
            }
        }
        if (failed) break;
        /* Start every idle engine with work, in order (after all events at `now`); one alone may
         * run ahead, and when its routing makes others act, their start phase comes at that time. */
        while (now < horizon) {
            int m = 0;
            for (int j = 0; j < N.J; j++) starting[j] = !N.busy[j] && N.E[j].in_engine > 0;
            for (int j = 0; j < N.J; j++) m += starting[j];
            int rc = 0;
            for (int j = 0; j < N.J && rc == 0; j++)
                if (starting[j]) rc = start(&N, &P, j, now, m == 1, &last, &at);
            if (rc < 0) { failed = 1; break; }
            if (rc == 0) break;
            now = at;  /* handled up to a batch end at `at`: the start phase there */
        }
        if (failed) break;
    }
    free(starting);
    if (failed) goto done;
    PyObject *per = PyList_New(N.J);
    if (!per) goto done;
    for (int j = 0; j < N.J; j++) {
        Engine *E = &N.E[j];
        engine_settle_counts(E);
        PyObject *ends = buf_take(&E->ends), *tokens = buf_take(&E->tokens), *detail = buf_take(&E->detail);
        PyObject *item = (ends && tokens && detail)
            ? Py_BuildValue("OOOLnLL", ends, tokens, detail, (long long)E->violations, (Py_ssize_t)E->turns,
                            (long long)E->in_engine, (long long)E->total_prefill) : NULL;
        Py_XDECREF(ends);
        Py_XDECREF(tokens);
        Py_XDECREF(detail);
        if (!item) { Py_DECREF(per); goto done; }
        PyList_SET_ITEM(per, j, item);
    }
    result = Py_BuildValue("dnnN", last, N.nsub, N.njobs, per);
done:
    if (N.E)
        for (int j = 0; j < N.J; j++) engine_free(&N.E[j]);
    free(N.E); free(N.busy); free(N.tok); free(N.joins); free(N.events.a); free(pl); free(dl);
    for (int k = 0; k < nb; k++) PyBuffer_Release(&b[k]);
    if (counts_b.obj) PyBuffer_Release(&counts_b);
    return result;
}

/* ---- a pool of replicas behind a dynamic router (cluster/sim.py) ------------------------ */

/* The built-in dynamic routers (cluster/routers.py): fewest in flight, fewest outstanding tokens
 * (ties take turns), and power of d choices (the d picks drawn by the router, ties to the first). */
enum { ROUTE_JSQ = 0, ROUTE_LEAST_TOKENS = 1, ROUTE_POWER_OF_D = 2 };

/* A finish (or rejection) the router hears of at `time`. */
typedef struct { double time; int64_t seq; int64_t j, work; } Report;
#define REPORT_LESS(x, y) ((x)->time < (y)->time || ((x)->time == (y)->time && (x)->seq < (y)->seq))
DEFINE_HEAP(Reports, Report, REPORT_LESS)

typedef struct {
    int J;
    Engine *E;
    Req *R;
    const double *arrivals;
    int64_t *rejected;        /* per request: 1 turned away at admission */
    double *clock;            /* each replica's time */
    int64_t *holding;         /* requests routed to it and not yet finished (what it really holds) */
    int64_t *in_flight, *outstanding;   /* what the router knows */
    Buf *mine;                /* each replica's requests, in arrival order */
    Py_ssize_t *cursor;       /* ... of which mine[:cursor] have been admitted */
    Reports reports;
    int64_t seq;
} Pool;

static inline int hear(Pool *P, double time, int j, int64_t r) {
    return Reports_push(&P->reports, (Report){time, P->seq++, j, P->R->prompts[r] + P->R->outputs[r]});
}

/* What a batch (or a round) of replica j finished: the router hears at their finish times. */
static int pool_finished(Pool *P, int j) {
    Engine *E = &P->E[j];
    Buf *lists[2] = {&E->pfin, &E->dfin};
    for (int l = 0; l < 2; l++) {
        Py_ssize_t n = (Py_ssize_t)(lists[l]->size / sizeof(int64_t));
        const int64_t *rid = (const int64_t *)lists[l]->data;
        for (Py_ssize_t k = 0; k < n; k++)
            if (hear(P, P->R->finish[rid[k]], j, rid[k])) return -1;
        P->holding[j] -= n;
        lists[l]->size = 0;
    }
    return 0;
}

/* Stepper.advance(until) of replica j: the loop of run() resumed at its clock, fed by its own
 * requests; the batches that start before `until` (it stops at the first boundary at or after
 * it, or idles). */
static int pool_advance(Pool *P, Reporter *rep, int j, double until) {
    Engine *E = &P->E[j];
    const double *arrivals = P->arrivals;
    const int64_t *mine = (const int64_t *)P->mine[j].data;
    Py_ssize_t n = (Py_ssize_t)(P->mine[j].size / sizeof(int64_t)), i = P->cursor[j];
    double now = P->clock[j];
    for (;;) {
        while (i < n && arrivals[mine[i]] <= now) {
            int64_t r = mine[i++];
            int ok = engine_admit(E, r);
            if (ok < 0) return -1;
            if (!ok) {   /* turned away: the router hears at once */
                P->rejected[r] = 1;
                P->holding[j]--;
                if (hear(P, arrivals[r], j, r)) return -1;
            }
        }
        if (!E->in_engine) {
            if (i >= n || arrivals[mine[i]] > until) break;
            now = arrivals[mine[i]];
            continue;
        }
        if (now >= until) break;
        if (engine_batch(E, now, &now) || report(rep, 1, now) || pool_finished(P, j)) return -1;
        double lim = until;
        if (i < n && arrivals[mine[i]] < lim) lim = arrivals[mine[i]];
        int rc;
        do {   /* decode-only rounds, as in run(); a round that finishes someone is heard */
            rc = engine_rounds(E, &now, lim);
            if (rc < 0 || pool_finished(P, j)) return -1;
        } while (rc == 1);
    }
    P->cursor[j] = i;
    P->clock[j] = now;
    return 0;
}

static inline int64_t least_of(const int64_t *v, int J, int start) {
    int best = start;
    int64_t value = v[start];
    for (int k = 1; k < J; k++) {
        int j = start + k;
        if (j >= J) j -= J;
        if (v[j] < value) { best = j; value = v[j]; }
    }
    return best;
}

PyDoc_STRVAR(run_pool_doc,
"run_pool(engines, arrivals, prompts, outputs, router, picks, d, delay, horizon, ring, replica, first,\n"
"         finish, rejected, progress)\n"
"--\n\n"
"A pool of engines behind a dynamic router on the compiled core: the event loop of\n"
"llmqueue.cluster.sim._dynamic in C (that module calls it and documents the rules).  engines: one\n"
"run_network engine spec per replica (one queue group); router 0 jsq, 1 least-tokens, 2 power-of-d\n"
"(picks: n x d replica indices drawn by the router); delay: the reporting delay.  Writes each\n"
"request's replica, first-token and finish times and rejection; returns [(ends, tokens,\n"
"violations, in_engine, now) per replica].  progress: None, or called with (now, arrivals routed)\n"
"every 2,000 batches.");

static PyObject *run_pool(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *engines, *progress;
    Py_buffer b[8];
    int router;
    long long d, ring;
    double delay, horizon;
    memset(b, 0, sizeof(b));
    if (!PyArg_ParseTuple(args, "O!y*y*y*iy*LddLw*w*w*w*O:run_pool", &PyTuple_Type, &engines, &b[0], &b[1], &b[2],
                          &router, &b[3], &d, &delay, &horizon, &ring, &b[4], &b[5], &b[6], &b[7], &progress))
        return NULL;
    PyObject *result = NULL;
    Pool P;
    memset(&P, 0, sizeof(P));
    Reporter rep = {progress, 0, 0, 0, 0};
    Py_buffer *eb = NULL;   /* each replica's four spec buffers */
    int neb = 0;
    int64_t *pl = NULL, *dl = NULL;
    Py_ssize_t n = b[0].len / (Py_ssize_t)sizeof(double);
    P.J = (int)PyTuple_GET_SIZE(engines);
    if (!buffer_ok(&b[0], "arrivals", n, 8) || !buffer_ok(&b[1], "prompts", n, 8) || !buffer_ok(&b[2], "outputs", n, 8)
        || !buffer_ok(&b[4], "replica", n, 8) || !buffer_ok(&b[5], "first", n, 8) || !buffer_ok(&b[6], "finish", n, 8)
        || !buffer_ok(&b[7], "rejected", n, 8))
        goto done;
    if (progress != Py_None && !PyCallable_Check(progress)) {
        PyErr_SetString(PyExc_TypeError, "progress must be callable or None");
        goto done;
    }
    if (P.J < 1 || router < ROUTE_JSQ || router > ROUTE_POWER_OF_D
        || (router == ROUTE_POWER_OF_D && (d < 1 || d > P.J || b[3].len != (Py_ssize_t)(n * d * 8))) || !(delay >= 0)) {
        PyErr_SetString(PyExc_ValueError, "run_pool: bad replicas, router or picks");
        goto done;
    }
    const double *arrivals = b[0].buf;
    const int64_t *prompts = b[1].buf, *outputs = b[2].buf, *picks = b[3].buf;
    int64_t *replica = b[4].buf;
    for (Py_ssize_t i = 0; i < n; i++)
        if (!(arrivals[i] == arrivals[i]) || (i && arrivals[i] < arrivals[i - 1]) || prompts[i] < 1 || outputs[i] < 0) {
            PyErr_SetString(PyExc_ValueError, "run_pool: arrivals must be ordered, prompts >= 1, outputs >= 0");
            goto done;
        }
    if (router == ROUTE_POWER_OF_D)
        for (Py_ssize_t k = 0; k < n * d; k++)
            if (picks[k] < 0 || picks[k] >= P.J) {
                PyErr_SetString(PyExc_ValueError, "run_pool: a pick outside the pool");
                goto done;
            }
    pl = malloc((size_t)(n + 1) * sizeof(int64_t));
    dl = malloc((size_t)(n + 1) * sizeof(int64_t));
    eb = calloc((size_t)P.J * 4, sizeof(Py_buffer));
    P.E = calloc((size_t)P.J, sizeof(Engine));
    P.clock = calloc((size_t)P.J, sizeof(double));
    P.holding = calloc((size_t)P.J, sizeof(int64_t));
    P.in_flight = calloc((size_t)P.J, sizeof(int64_t));
    P.outstanding = calloc((size_t)P.J, sizeof(int64_t));
    P.mine = calloc((size_t)P.J, sizeof(Buf));
    P.cursor = calloc((size_t)P.J, sizeof(Py_ssize_t));
    if (!pl || !dl || !eb || !P.E || !P.clock || !P.holding || !P.in_flight || !P.outstanding || !P.mine || !P.cursor) {
        PyErr_NoMemory();
        goto done;
    }
    Req R = {pl, dl, prompts, outputs, NULL, b[5].buf, b[6].buf};
    P.R = &R;
    P.arrivals = arrivals;
    P.rejected = b[7].buf;
    int64_t longest = longest_of(outputs, n);
    for (int j = 0; j < P.J; j++) {
        PyObject *spec = PyTuple_GET_ITEM(engines, j);
        if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) < 9) {
            PyErr_SetString(PyExc_ValueError, "bad engine spec");
            goto done;
        }
        int first_b = neb;
        for (int k = 0; k < 4; k++)
            if (PyObject_GetBuffer(PyTuple_GET_ITEM(spec, k), &eb[neb++], PyBUF_SIMPLE)) { neb--; goto done; }
        long long budget = PyLong_AsLongLong(PyTuple_GET_ITEM(spec, 4));
        long long cap = PyLong_AsLongLong(PyTuple_GET_ITEM(spec, 5));
        int splits = PyObject_IsTrue(PyTuple_GET_ITEM(spec, 6)), has_useful = PyObject_IsTrue(PyTuple_GET_ITEM(spec, 7));
        long G = PyLong_AsLong(PyTuple_GET_ITEM(spec, 8));
        if (PyErr_Occurred()) goto done;
        if (G != 1) {
            PyErr_SetString(PyExc_ValueError, "run_pool: a replica has one queue group");
            goto done;
        }
        if (engine_init(&P.E[j], &R, &rep, eb[first_b].buf, eb[first_b].len / 8, eb[first_b + 1].buf,
                        eb[first_b + 1].len / 8, budget, cap, splits, eb[first_b + 2].buf, eb[first_b + 2].len / 8,
                        has_useful, eb[first_b + 3].buf, eb[first_b + 3].len / 8, 1, 0, 1, n, longest, ring))
            goto done;
    }
    int turn = 0, J = P.J;
    for (Py_ssize_t i = 0; i < n; i++) {
        double seen = arrivals[i] - delay;
        rep.admitted = i;
        const int64_t *wanted = router == ROUTE_POWER_OF_D ? picks + i * d : NULL;
        int m = wanted ? (int)d : J;
        for (int k = 0; k < m; k++) {
            int j = wanted ? (int)wanted[k] : k;
            if (P.holding[j] && P.clock[j] < seen && pool_advance(&P, &rep, j, seen)) goto done;
        }
        while (P.reports.n && P.reports.a[0].time <= seen) {
            Report h = Reports_pop(&P.reports);
            P.in_flight[h.j]--;
            P.outstanding[h.j] -= h.work;
        }
        int64_t j;
        if (router == ROUTE_POWER_OF_D) {
            j = wanted[0];
            for (int k = 1; k < m; k++)
                if (P.in_flight[wanted[k]] < P.in_flight[j]) j = wanted[k];
        } else {
            turn = turn + 1 < J ? turn + 1 : 0;
            j = least_of(router == ROUTE_JSQ ? P.in_flight : P.outstanding, J, turn);
        }
        replica[i] = j;
        if (push_rid(&P.mine[j], i)) goto done;
        P.holding[j]++;
        P.in_flight[j]++;
        P.outstanding[j] += prompts[i] + outputs[i];
    }
    rep.admitted = n;
    PyObject *per = PyList_New(J);
    if (!per) goto done;
    for (int j = 0; j < J; j++) {
        Engine *E = &P.E[j];
        if (pool_advance(&P, &rep, j, horizon)) { Py_DECREF(per); goto done; }
        PyObject *ends = buf_take(&E->ends), *tokens = buf_take(&E->tokens);
        PyObject *item = (ends && tokens) ? Py_BuildValue("OOLLd", ends, tokens, (long long)E->violations,
                                                          (long long)E->in_engine, P.clock[j]) : NULL;
        Py_XDECREF(ends);
        Py_XDECREF(tokens);
        if (!item) { Py_DECREF(per); goto done; }
        PyList_SET_ITEM(per, j, item);
    }
    result = per;
done:
    if (P.E)
        for (int j = 0; j < P.J; j++) engine_free(&P.E[j]);
    if (P.mine)
        for (int j = 0; j < P.J; j++) buf_free(&P.mine[j]);
    free(P.E); free(P.clock); free(P.holding); free(P.in_flight); free(P.outstanding); free(P.mine); free(P.cursor);
    free(P.reports.a); free(pl); free(dl);
    for (int k = 0; k < neb; k++) PyBuffer_Release(&eb[k]);
    free(eb);
    for (int k = 0; k < 8; k++)
        if (b[k].obj) PyBuffer_Release(&b[k]);
    return result;
}

/* ---- sampling jobs' routes (network/routes.py Route.sample) ------------------------------ */

enum { MOVE = 0, FORK = 1, END = 2 };

/* One class's route as a table of states (hop, round counters) and the moves after each
 * (Route.sampling_table), its per-hop random streams drawn ahead (routes._Stream's draws), and
 * the flat arrays being written (network/fast.py Flat). */
typedef struct {
    const int64_t *st_hop, *st_ostart, *o_kind, *o_a, *o_b, *o_c, *branches;
    const double *o_prob;
    const int64_t *h_engine, *h_grow, *h_buffer, *h_group;
    const int64_t **p, **o;
    const double **d, *u;
    Py_ssize_t *np_, *no, *nd, nu;     /* stream lengths */
    Py_ssize_t *ip, *io, *id, iu;      /* positions */
    int64_t need;                      /* the stream that ran out: 3 h + (0 p, 1 o, 2 d), or 3 H for u */
    int H;
    Buf v_engine, v_hop, v_prompt, v_output, v_buffer, v_group, v_delay;
    Buf seg_vstart, seg_vcount, seg_bstart, seg_bcount, seg_join, children;
    int64_t nseg, nvis;
} Sampler;

#define SET(buf, k, value, type) (((type *)(buf).data)[k] = (value))

static int grow_to(Buf *b, int64_t items, size_t size) {
    if ((size_t)items * size <= b->size) return 0;
    if (buf_reserve(b, (size_t)items * size - b->size)) return -1;
    b->size = (size_t)items * size;
    return 0;
}

static int64_t new_segment(Sampler *S) {
    int64_t s = S->nseg++;
    if (grow_to(&S->seg_vstart, S->nseg, 8) || grow_to(&S->seg_vcount, S->nseg, 8) || grow_to(&S->seg_bstart, S->nseg, 8)
        || grow_to(&S->seg_bcount, S->nseg, 8) || grow_to(&S->seg_join, S->nseg, 8))
        return -1;
    SET(S->seg_vstart, s, S->nvis, int64_t);
    SET(S->seg_vcount, s, 0, int64_t);
    SET(S->seg_bstart, s, 0, int64_t);
    SET(S->seg_bcount, s, 0, int64_t);
    SET(S->seg_join, s, -1, int64_t);
    return s;
}

/* Route._walk from state `st` with `carry`: one segment (and, at a fork, its branches and join);
 * returns the segment, *carry the carry at its end, *total += tokens.  -1: error, -2: a stream ran
 * out (S->need). */
static int64_t walk(Sampler *S, int64_t st, int64_t *carry, int64_t *total) {
    int64_t seg = new_segment(S);
    if (seg < 0) return -1;
    for (;;) {
        int64_t h = S->st_hop[st], e = S->h_engine[h], v = S->nvis++;
        if (grow_to(&S->v_engine, S->nvis, 8) || grow_to(&S->v_hop, S->nvis, 8) || grow_to(&S->v_prompt, S->nvis, 8)
            || grow_to(&S->v_output, S->nvis, 8) || grow_to(&S->v_buffer, S->nvis, 8) || grow_to(&S->v_group, S->nvis, 8)
            || grow_to(&S->v_delay, S->nvis, 8))
            return -1;
        SET(S->v_engine, v, e, int64_t);
        SET(S->v_hop, v, h, int64_t);
        if (e >= 0) {
            if (S->ip[h] >= S->np_[h]) { S->need = 3 * h; return -2; }
            if (S->io[h] >= S->no[h]) { S->need = 3 * h + 1; return -2; }
            int64_t prompt = S->p[h][S->ip[h]++] + (S->h_grow[h] ? *carry : 0), output = S->o[h][S->io[h]++];
            SET(S->v_prompt, v, prompt, int64_t);
            SET(S->v_output, v, output, int64_t);
            SET(S->v_buffer, v, S->h_buffer[h], int64_t);
            SET(S->v_group, v, S->h_group[h], int64_t);
            SET(S->v_delay, v, 0.0, double);
            *total += prompt + output;
            *carry = output;
        } else {
            if (S->id[h] >= S->nd[h]) { S->need = 3 * h + 2; return -2; }
            SET(S->v_prompt, v, 0, int64_t);
            SET(S->v_output, v, 0, int64_t);
            SET(S->v_buffer, v, 0, int64_t);
            SET(S->v_group, v, 0, int64_t);
            SET(S->v_delay, v, S->d[h][S->id[h]++], double);
        }
        ((int64_t *)S->seg_vcount.data)[seg]++;
        int64_t first = S->st_ostart[st], count = S->st_ostart[st + 1] - first, k = first;
        if (count > 1) {  /* Route._choose: the first move whose cumulative probability exceeds u */
            if (S->iu >= S->nu) { S->need = 3 * (int64_t)S->H; return -2; }
            double u = S->u[S->iu++], acc = 0.0;
            k = first + count - 1;
            for (int64_t m = first; m < first + count; m++) {
                acc += S->o_prob[m];
                if (u < acc) { k = m; break; }
            }
        }
        if (S->o_kind[k] == FORK) {
            int64_t n = S->o_b[k], joined = 0, kids[64];
            if (n > 64) {
                PyErr_SetString(PyExc_ValueError, "a fork of more than 64 branches");
                return -1;
            }
            for (int64_t b = 0; b < n; b++) {
                int64_t c = *carry;
                kids[b] = walk(S, S->branches[S->o_a[k] + b], &c, total);
                if (kids[b] < 0) return kids[b];
                joined += c;
            }
            Py_ssize_t at = (Py_ssize_t)(S->children.size / 8);
            if (grow_to(&S->children, at + n, 8)) return -1;
            for (int64_t b = 0; b < n; b++) SET(S->children, at + b, kids[b], int64_t);
            SET(S->seg_bstart, seg, at, int64_t);
            SET(S->seg_bcount, seg, n, int64_t);
            *carry = joined;
            int64_t j = walk(S, S->o_c[k], carry, total);
            if (j < 0) return j;
            SET(S->seg_join, seg, j, int64_t);
            return seg;
        }
        if (S->o_kind[k] == END) return seg;
        st = S->o_a[k];
    }
}

PyDoc_STRVAR(sample_jobs_doc,
"sample_jobs(table, hops, streams, n_jobs)\n"
"--\n\n"
"Sample n_jobs jobs of one class (network/fast.py calls it).  Returns (visits, segments, roots,\n"
"tokens) as tuples of bytearrays, or an int: the stream that ran out (3 h + 0/1/2 for hop h's\n"
"prompt/output/delay stream, 3 H for the route-choice stream; draw more and call again).");

static PyObject *sample_jobs(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *table, *hops, *streams;
    Py_ssize_t n_jobs;
    if (!PyArg_ParseTuple(args, "O!O!O!n:sample_jobs", &PyTuple_Type, &table, &PyTuple_Type, &hops, &PyTuple_Type,
                          &streams, &n_jobs))
        return NULL;
    if (PyTuple_GET_SIZE(table) != 8 || PyTuple_GET_SIZE(hops) != 4 || PyTuple_GET_SIZE(streams) != 4) {
        PyErr_SetString(PyExc_ValueError, "bad sampler arrays");
        return NULL;
    }
    Sampler S;
    memset(&S, 0, sizeof(S));
    enum { NB = 16 };
    Py_buffer b[NB];
    Py_buffer *sb = NULL;
    int nb = 0, nsb = 0;
    PyObject *result = NULL;
    memset(b, 0, sizeof(b));
    const void *ptr[12];
    for (int k = 0; k < 12; k++) {
        PyObject *item = k < 8 ? PyTuple_GET_ITEM(table, k) : PyTuple_GET_ITEM(hops, k - 8);
        if (PyObject_GetBuffer(item, &b[nb], PyBUF_SIMPLE)) goto done;
        ptr[k] = b[nb++].buf;
    }
    S.st_hop = ptr[0]; S.st_ostart = ptr[1]; S.o_prob = ptr[2]; S.o_kind = ptr[3]; S.o_a = ptr[4]; S.o_b = ptr[5];
    S.o_c = ptr[6]; S.branches = ptr[7];
    S.h_engine = ptr[8]; S.h_grow = ptr[9]; S.h_buffer = ptr[10]; S.h_group = ptr[11];
    S.H = (int)(b[8].len / 8);
    {   /* the table is consistent (Route.sampling_table builds it) */
        Py_ssize_t n_states = b[0].len / 8, n_moves = b[2].len / 8, n_branches = b[7].len / 8;
        const char *bad = NULL;
        if (n_states < 1 || b[1].len / 8 != n_states + 1 || S.st_ostart[0] != 0 || S.st_ostart[n_states] != n_moves)
            bad = "states";
        for (int k = 3; k < 7 && !bad; k++)
            if (b[k].len / 8 != n_moves) bad = "move arrays of different lengths";
        for (int k = 9; k < 12 && !bad; k++)
            if (b[k].len / 8 != S.H) bad = "hop arrays of different lengths";
        for (Py_ssize_t i = 0; i < n_states && !bad; i++)
            if (S.st_hop[i] < 0 || S.st_hop[i] >= S.H || S.st_ostart[i] >= S.st_ostart[i + 1]) bad = "a state";
        for (Py_ssize_t m = 0; m < n_moves && !bad; m++) {
            int64_t kind = S.o_kind[m];
            if (kind == MOVE ? (S.o_a[m] < 0 || S.o_a[m] >= n_states)
                : kind == FORK ? (S.o_a[m] < 0 || S.o_b[m] < 1 || S.o_a[m] + S.o_b[m] > n_branches || S.o_c[m] < 0
                                  || S.o_c[m] >= n_states)
                : kind != END)
                bad = "a move";
        }
        for (Py_ssize_t k = 0; k < n_branches && !bad; k++)
            if (S.branches[k] < 0 || S.branches[k] >= n_states) bad = "a branch";
        if (bad) {
            PyErr_Format(PyExc_ValueError, "sample_jobs: inconsistent %s", bad);
            goto done;
        }
    }
    PyObject *ps = PyTuple_GET_ITEM(streams, 0), *os = PyTuple_GET_ITEM(streams, 1), *ds = PyTuple_GET_ITEM(streams, 2);
    if (!PyTuple_Check(ps) || !PyTuple_Check(os) || !PyTuple_Check(ds) || PyTuple_GET_SIZE(ps) != S.H
        || PyTuple_GET_SIZE(os) != S.H || PyTuple_GET_SIZE(ds) != S.H) {
        PyErr_SetString(PyExc_ValueError, "bad streams");
        goto done;
    }
    sb = calloc((size_t)(3 * S.H + 1), sizeof(Py_buffer));
    S.p = calloc((size_t)S.H + 1, sizeof(int64_t *));
    S.o = calloc((size_t)S.H + 1, sizeof(int64_t *));
    S.d = calloc((size_t)S.H + 1, sizeof(double *));
    S.np_ = calloc((size_t)S.H + 1, sizeof(Py_ssize_t)); S.no = calloc((size_t)S.H + 1, sizeof(Py_ssize_t));
    S.nd = calloc((size_t)S.H + 1, sizeof(Py_ssize_t)); S.ip = calloc((size_t)S.H + 1, sizeof(Py_ssize_t));
    S.io = calloc((size_t)S.H + 1, sizeof(Py_ssize_t)); S.id = calloc((size_t)S.H + 1, sizeof(Py_ssize_t));
    if (!sb || !S.p || !S.o || !S.d || !S.np_ || !S.no || !S.nd || !S.ip || !S.io || !S.id) {
        PyErr_NoMemory();
        goto done;
    }
    for (int h = 0; h < S.H; h++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(ps, h), &sb[nsb], PyBUF_SIMPLE)) goto done;
        S.p[h] = sb[nsb].buf; S.np_[h] = sb[nsb++].len / 8;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(os, h), &sb[nsb], PyBUF_SIMPLE)) goto done;
        S.o[h] = sb[nsb].buf; S.no[h] = sb[nsb++].len / 8;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(ds, h), &sb[nsb], PyBUF_SIMPLE)) goto done;
        S.d[h] = sb[nsb].buf; S.nd[h] = sb[nsb++].len / 8;
    }
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(streams, 3), &sb[nsb], PyBUF_SIMPLE)) goto done;
    S.u = sb[nsb].buf; S.nu = sb[nsb++].len / 8;
    Buf *outs[] = {&S.v_engine, &S.v_hop, &S.v_prompt, &S.v_output, &S.v_buffer, &S.v_group, &S.v_delay,
                   &S.seg_vstart, &S.seg_vcount, &S.seg_bstart, &S.seg_bcount, &S.children, &S.seg_join};
    Buf roots = {0}, tokens = {0};
    for (size_t k = 0; k < sizeof(outs) / sizeof(outs[0]); k++) outs[k]->python = 1;
    roots.python = tokens.python = 1;
    if (grow_to(&roots, n_jobs, 8) || grow_to(&tokens, n_jobs, 8)) goto fail;
    for (Py_ssize_t j = 0; j < n_jobs; j++) {
        int64_t carry = 0, total = 0, seg = walk(&S, 0, &carry, &total);
        if (seg == -2) {
            result = PyLong_FromLongLong((long long)S.need);
            goto fail;
        }
        if (seg < 0) goto fail;
        SET(roots, j, seg, int64_t);
        SET(tokens, j, total, int64_t);
        if ((j & 0xffff) == 0xffff && PyErr_CheckSignals()) goto fail;
    }
    {
        PyObject *t1 = PyTuple_New(7), *t2 = PyTuple_New(6);
        if (t1 && t2) {
            for (int k = 0; k < 7; k++) PyTuple_SET_ITEM(t1, k, buf_take(outs[k]));
            for (int k = 0; k < 6; k++) PyTuple_SET_ITEM(t2, k, buf_take(outs[7 + k]));
            result = Py_BuildValue("NNNN", t1, t2, buf_take(&roots), buf_take(&tokens));
        } else {
            Py_XDECREF(t1);
            Py_XDECREF(t2);
        }
    }
fail:
    for (size_t k = 0; k < sizeof(outs) / sizeof(outs[0]); k++) buf_free(outs[k]);
    buf_free(&roots);
    buf_free(&tokens);
done:
    for (int k = 0; k < nb; k++) PyBuffer_Release(&b[k]);
    for (int k = 0; k < nsb; k++) PyBuffer_Release(&sb[k]);
    free(sb); free(S.p); free(S.o); free(S.d); free(S.np_); free(S.no); free(S.nd); free(S.ip); free(S.io); free(S.id);
    return result;
}

/* ---- the module ------------------------------------------------------------------------- */

static PyMethodDef methods[] = {
    {"run", run, METH_VARARGS, run_doc},
    {"run_network", run_network, METH_VARARGS, run_network_doc},
    {"run_pool", run_pool, METH_VARARGS, run_pool_doc},
    {"sample_jobs", sample_jobs, METH_VARARGS, sample_jobs_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastcore", "The simulator's compiled core (llmqueue.core.fastcore, llmqueue.network.sim).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastcore(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddStringConstant(m, "SOURCE_SHA256", LLMQUEUE_FASTCORE_SHA256) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
