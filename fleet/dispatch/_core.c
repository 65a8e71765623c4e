/* The dispatcher's hot loop in C: fleet.dispatch._core.Core.
 *
 * The same interface and behaviour as fleet/dispatch/core.py (the reference;
 * read its docstring first) and fleet/dispatch/broker.py, which this file
 * follows function by function: both pass tests/unit/test_dispatch_core.py.
 * What every request crosses is here: reading Mongrel2's ZMTP frames, the
 * route (sender, connection id, control or not), the broker's choice of a
 * thread, the worker links in both directions. The rare paths (flow-control
 * credits, malformed messages, answering clients, READY) call the glue.
 *
 * Threads: run() waits in epoll_wait without the GIL and without the core's
 * mutex, then takes the mutex, then the GIL, and handles the whole batch.
 * Every other method takes the mutex the same way (the GIL released while
 * it waits), so no thread ever holds the GIL while waiting for the mutex and
 * there is no deadlock. The mutex is recursive: the glue's callbacks, which
 * run inside the batch, may call the core's methods.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <math.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* Kept equal to the Python reference (broker.py, core.py, zmtp.py); test_dispatch_core checks. */
#define MAX_BACKLOG 10000
#define MAX_GONE_PIDS 4096
#define CLOSED_MEMORY 60.0
#define PACK_WITHIN 0.002
#define PACK_PAUSE 10.0
#define PAUSE_AFTER 10
#define MAX_CLOSED 4096
#define MAX_FRAME (1ULL << 30)
#define RECV_SIZE 65536
#define TICK_MS 50
#define GLUE_TICK 0.01
#define MAX_SENDER 256
#define MAX_CONN_DIGITS 10
#define MAX_EVENTS 256

enum { TAG_LISTENER = 1, TAG_WAKE, TAG_CONN, TAG_MONGREL2, TAG_WATCHED };
#define EV_DATA(tag, value) (((uint64_t)(tag) << 32) | (uint32_t)(value))

/* -- buffers ---------------------------------------------------------------- */

typedef struct {
    char *p;
    size_t start, end, cap;
} Buf;

static size_t buf_len(const Buf *b) { return b->end - b->start; }

static int buf_reserve(Buf *b, size_t extra) {
    if (b->cap - b->end >= extra) return 0;
    if (b->start) { /* move what is left to the front first */
        memmove(b->p, b->p + b->start, b->end - b->start);
        b->end -= b->start;
        b->start = 0;
        if (b->cap - b->end >= extra) return 0;
    }
    size_t cap = b->cap ? b->cap : 4096;
    while (cap - b->end < extra) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) { PyErr_NoMemory(); return -1; }
    b->p = p;
    b->cap = cap;
    return 0;
}

static int buf_append(Buf *b, const void *data, size_t n) {
    if (buf_reserve(b, n) < 0) return -1;
    memcpy(b->p + b->end, data, n);
    b->end += n;
    return 0;
}

static void buf_consume(Buf *b, size_t n) {
    b->start += n;
    if (b->start == b->end) b->start = b->end = 0;
}

static void buf_free(Buf *b) {
    free(b->p);
    b->p = NULL;
    b->start = b->end = b->cap = 0;
}

static void put_u32(char *p, uint32_t v) {
    p[0] = (char)(v >> 24); p[1] = (char)(v >> 16); p[2] = (char)(v >> 8); p[3] = (char)v;
}

static uint32_t get_u32(const char *p) {
    const unsigned char *u = (const unsigned char *)p;
    return ((uint32_t)u[0] << 24) | ((uint32_t)u[1] << 16) | ((uint32_t)u[2] << 8) | u[3];
}

static double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* -- state ------------------------------------------------------------------- */

typedef struct {
    uint64_t key;      /* index << 40 | connection id */
    PyObject *sender;  /* bytes */
    PyObject *raw;     /* bytes: the request as Mongrel2 sent it */
    double since;
} Held;

typedef struct {      /* broker.Thread */
    int used;
    PyObject *ident;
    long pid;
    long credits;
    int retiring;
    Held *held;
    int nheld, capheld;
    long owed;         /* credits of requests it gave back, returned with its next DONE */
    int tier;          /* 0 none, 1 idle, 2 spare */
    int prev, next;    /* neighbours in its tier's list */
    uint64_t order;    /* creation order, for iterating as the reference's dict does */
} Thread;

typedef struct {      /* link.LinkServer's _Conn */
    int fd;
    PyObject *ident;   /* NULL until HELLO */
    Buf in, out;
    int waiting;       /* EPOLLOUT registered: a full socket */
    int dirty;         /* something queued, not flushed */
} Conn;

typedef struct {      /* an attached Mongrel2 connection */
    int fd;            /* -1 when none */
    Buf in;
    int in_multipart;
} Mongrel2;

typedef struct {
    int index;
    PyObject *sender, *conn_id, *raw;
} Waiting;

typedef struct { int head, tail; } Tier;

typedef struct {
    PyObject_HEAD
    int initialized;
    pthread_mutex_t mutex;
    int epfd, listen_fd, wake_fd;
    volatile int stopping;
    PyObject *glue;
    int nmongrel2;
    Mongrel2 *mongrel2;
    Conn **conns;       /* by fd */
    int nconns_cap;
    int *dirty;
    int ndirty, capdirty;
    PyObject *by_ident; /* ident -> fd */
    PyObject *watched;  /* set of foreign fds */
    Thread *threads;
    int nthreads;
    uint64_t next_order;
    PyObject *thread_of; /* ident -> slot */
    Tier idle, spare;
    PyObject *holder;   /* key -> slot */
    PyObject *parked;   /* key -> list of (sender, raw) */
    PyObject *streams;  /* keys whose messages all go to their holder (broker._streams) */
    Waiting *backlog;
    int bl_head, bl_len, bl_cap;
    PyObject *served;   /* pid -> int */
    PyObject *gone;     /* pid -> None, oldest first */
    PyObject *balance;  /* key -> credits (flow control) */
    PyObject *closed;   /* key -> when its worker closed it (float), oldest first */
    PyObject *dropped;  /* waiting tuples of messages dropped for closed connections, for the glue */
    int accepting;
    double ticked_at;
    double pack_within; /* broker.PACK_WITHIN, or the constructor's */
    double pack_pause;     /* broker.PACK_PAUSE, or the constructor's */
    double packs_again_at; /* broker._packs_again_at */
    int give_backs;        /* in the second that began at give_backs_from */
    double give_backs_from;
} Core;

static PyObject *zero, *one;
static PyObject *str_on_tick, *str_on_fd, *str_on_lost, *str_on_ready, *str_on_figures, *str_on_rejected,
    *str_on_unknown, *str_answer, *str_request_credits, *str_control_event, *str_credits, *str_disconnect, *str_dropped;

#define LOCK(self) do { Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&(self)->mutex); Py_END_ALLOW_THREADS } while (0)
#define UNLOCK(self) pthread_mutex_unlock(&(self)->mutex)

/* A glue callback's error must not stop the loop: report it and go on. */
static void glue_failed(Core *self, PyObject *name) {
    PyErr_WriteUnraisable(name);
}

static PyObject *glue_call(Core *self, PyObject *name, const char *format, ...) {
    va_list va;
    va_start(va, format);
    PyObject *args = Py_VaBuildValue(format, va);
    va_end(va);
    if (!args) { glue_failed(self, name); return NULL; }
    PyObject *method = PyObject_GetAttr(self->glue, name);
    PyObject *result = method ? PyObject_CallObject(method, args) : NULL;
    Py_XDECREF(method);
    Py_DECREF(args);
    if (!result) glue_failed(self, name);
    return result;
}

static void glue_notify(Core *self, PyObject *name, const char *format, ...) {
    va_list va;
    va_start(va, format);
    PyObject *args = Py_VaBuildValue(format, va);
    va_end(va);
    if (!args) { glue_failed(self, name); return; }
    PyObject *method = PyObject_GetAttr(self->glue, name);
    PyObject *result = method ? PyObject_CallObject(method, args) : NULL;
    Py_XDECREF(method);
    Py_DECREF(args);
    if (!result) glue_failed(self, name);
    Py_XDECREF(result);
}

static PyObject *key_object(uint64_t key) { return PyLong_FromUnsignedLongLong(key); }

static PyObject *conn_id_bytes(uint64_t key) {
    char text[24];
    int n = snprintf(text, sizeof(text), "%llu", (unsigned long long)(key & ((1ULL << 40) - 1)));
    return PyBytes_FromStringAndSize(text, n);
}

/* -- tiers: threads with credits, idle ones first ---------------------------------- */

static void tier_remove(Core *self, int slot) {
    Thread *t = &self->threads[slot];
    if (!t->tier) return;
    Tier *tier = t->tier == 1 ? &self->idle : &self->spare;
    if (t->prev >= 0) self->threads[t->prev].next = t->next; else tier->head = t->next;
    if (t->next >= 0) self->threads[t->next].prev = t->prev; else tier->tail = t->prev;
    t->tier = 0;
    t->prev = t->next = -1;
}

static void tier_append(Core *self, int slot, int which) {
    Thread *t = &self->threads[slot];
    Tier *tier = which == 1 ? &self->idle : &self->spare;
    t->tier = which;
    t->next = -1;
    t->prev = tier->tail;
    if (tier->tail >= 0) self->threads[tier->tail].next = slot; else tier->head = slot;
    tier->tail = slot;
}

/* broker._file */
static void file_thread(Core *self, int slot) {
    Thread *t = &self->threads[slot];
    tier_remove(self, slot);
    if (t->credits <= 0 || t->retiring || t->owed) return;  /* owed: stuck, it said so */
    tier_append(self, slot, t->nheld ? 2 : 1);
}

static int is_stream(Core *self, uint64_t key) {
    if (!PySet_GET_SIZE(self->streams)) return 0;
    PyObject *k = key_object(key);
    int is = k ? PySet_Contains(self->streams, k) : 0;
    Py_XDECREF(k);
    if (is < 0) { PyErr_Clear(); is = 0; }
    return is;
}

static int has_idle_thread(Core *self, long pid) {
    for (int slot = self->idle.head; slot >= 0; slot = self->threads[slot].next) {
        if (self->threads[slot].pid == pid) return 1;
    }
    return 0;
}

/* broker._young_spare: a thread with room, serving a request it got less than pack_within ago,
 * in a worker with an idle thread; the one filed last first (it is awake) */
static int young_spare(Core *self) {
    if (self->spare.tail < 0 || self->idle.head < 0) return -1;
    double now = monotonic();
    if (now < self->packs_again_at) return -1;
    for (int slot = self->spare.tail; slot >= 0; slot = self->threads[slot].prev) {
        Thread *t = &self->threads[slot];
        if (!has_idle_thread(self, t->pid)) continue;
        if (t->nheld && now - t->held[0].since < self->pack_within && !is_stream(self, t->held[0].key)) return slot;
    }
    return -1;
}

static int worker_busy(Core *self, long pid) {
    for (int i = 0; i < self->nthreads; i++) {
        Thread *t = &self->threads[i];
        if (t->used && t->pid == pid && t->nheld) return 1;
    }
    return 0;
}

/* broker._pick */
static int pick(Core *self) {
    int packer = young_spare(self);
    if (packer >= 0) {
        int slot = packer;
        for (int idle = self->idle.head; idle >= 0; idle = self->threads[idle].next) {
            if (!worker_busy(self, self->threads[idle].pid)) { slot = idle; break; }
        }
        tier_remove(self, slot);
        return slot;
    }
    Tier *tiers[2] = {&self->idle, &self->spare};
    for (int i = 0; i < 2; i++) {
        if (tiers[i]->head >= 0) {
            int slot = tiers[i]->head;
            tier_remove(self, slot);
            return slot;
        }
    }
    return -1;
}

static int thread_slot(Core *self, PyObject *ident) {
    PyObject *slot = PyDict_GetItemWithError(self->thread_of, ident);
    if (!slot) return -1;
    return (int)PyLong_AsLong(slot);
}

static void held_clear(Held *h) {
    Py_CLEAR(h->sender);
    Py_CLEAR(h->raw);
}

static void thread_free(Core *self, int slot) {
    Thread *t = &self->threads[slot];
    tier_remove(self, slot);
    for (int i = 0; i < t->nheld; i++) held_clear(&t->held[i]);
    free(t->held);
    if (t->ident) PyDict_DelItem(self->thread_of, t->ident);
    Py_CLEAR(t->ident);
    memset(t, 0, sizeof(*t));
    t->prev = t->next = -1;
}

static int thread_new(Core *self, PyObject *ident, long pid) {
    int slot = -1;
    for (int i = 0; i < self->nthreads; i++) {
        if (!self->threads[i].used) { slot = i; break; }
    }
    if (slot < 0) {
        Thread *threads = realloc(self->threads, sizeof(Thread) * (self->nthreads + 16));
        if (!threads) { PyErr_NoMemory(); return -1; }
        self->threads = threads;
        for (int i = self->nthreads; i < self->nthreads + 16; i++) {
            memset(&threads[i], 0, sizeof(Thread));
            threads[i].prev = threads[i].next = -1;
        }
        slot = self->nthreads;
        self->nthreads += 16;
    }
    Thread *t = &self->threads[slot];
    t->used = 1;
    t->ident = Py_NewRef(ident);
    t->pid = pid;
    t->order = self->next_order++;
    PyObject *slot_obj = PyLong_FromLong(slot);
    if (!slot_obj || PyDict_SetItem(self->thread_of, ident, slot_obj) < 0) {
        Py_XDECREF(slot_obj);
        return -1;
    }
    Py_DECREF(slot_obj);
    return slot;
}

/* -- links: the worker threads' connections ------------------------------------------ */

static Conn *conn_of_ident(Core *self, PyObject *ident) {
    PyObject *fd = PyDict_GetItemWithError(self->by_ident, ident);
    if (!fd) return NULL;
    long value = PyLong_AsLong(fd);
    return value >= 0 && value < self->nconns_cap ? self->conns[value] : NULL;
}

static void broker_retire(Core *self, PyObject *ident);

static void conn_drop(Core *self, Conn *conn) {
    if (!conn) return;
    epoll_ctl(self->epfd, EPOLL_CTL_DEL, conn->fd, NULL);
    close(conn->fd);
    self->conns[conn->fd] = NULL;
    if (conn->ident) {
        PyObject *fd = PyDict_GetItemWithError(self->by_ident, conn->ident);
        if (fd && PyLong_AsLong(fd) == conn->fd) PyDict_DelItem(self->by_ident, conn->ident);
        /* The thread's link closed: it exited, or its process died (whose
         * requests get their 502 when the supervisor reaps it). */
        broker_retire(self, conn->ident);
        Py_CLEAR(conn->ident);
    }
    PyErr_Clear();
    buf_free(&conn->in);
    buf_free(&conn->out);
    free(conn);
}

static void conn_flush(Core *self, Conn *conn) {
    while (buf_len(&conn->out)) {
        ssize_t sent = send(conn->fd, conn->out.p + conn->out.start, buf_len(&conn->out), MSG_DONTWAIT | MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) break;
            conn_drop(self, conn);
            return;
        }
        buf_consume(&conn->out, (size_t)sent);
    }
    int want_out = buf_len(&conn->out) > 0;
    if (want_out != conn->waiting) {
        struct epoll_event ev = {.events = EPOLLIN | (want_out ? EPOLLOUT : 0), .data.u64 = EV_DATA(TAG_CONN, conn->fd)};
        epoll_ctl(self->epfd, EPOLL_CTL_MOD, conn->fd, &ev);
        conn->waiting = want_out;
    }
}

/* Queue a message of frames for a thread; 0 if it has no link (any more). */
static int link_send(Core *self, PyObject *ident, const char *const *frames, const size_t *sizes, int n) {
    Conn *conn = conn_of_ident(self, ident);
    if (!conn) { PyErr_Clear(); return 0; }
    size_t total = 0;
    for (int i = 0; i < n; i++) total += 4 + sizes[i];
    if (buf_reserve(&conn->out, 4 + total) < 0) { PyErr_Clear(); return 0; }
    char *p = conn->out.p + conn->out.end;
    put_u32(p, (uint32_t)total);
    p += 4;
    for (int i = 0; i < n; i++) {
        put_u32(p, (uint32_t)sizes[i]);
        memcpy(p + 4, frames[i], sizes[i]);
        p += 4 + sizes[i];
    }
    conn->out.end += 4 + total;
    if (!conn->dirty) {
        if (self->ndirty == self->capdirty) {
            int cap = self->capdirty ? self->capdirty * 2 : 64;
            int *dirty = realloc(self->dirty, sizeof(int) * cap);
            if (!dirty) { PyErr_Clear(); return 1; }
            self->dirty = dirty;
            self->capdirty = cap;
        }
        self->dirty[self->ndirty++] = conn->fd;
        conn->dirty = 1;
    }
    return 1;
}

static void links_flush(Core *self) {
    for (int i = 0; i < self->ndirty; i++) {
        int fd = self->dirty[i];
        Conn *conn = fd < self->nconns_cap ? self->conns[fd] : NULL;
        if (!conn) continue;
        conn->dirty = 0;
        if (!conn->waiting) conn_flush(self, conn);
    }
    self->ndirty = 0;
}

/* -- the broker -------------------------------------------------------------------- */

static void send_request(Core *self, int slot, int index, uint64_t key, PyObject *raw, char kind);
static void backlog_push_front(Core *self, int index, PyObject *sender, PyObject *conn_id, PyObject *raw);

static int held_index(Thread *t, uint64_t key) {
    for (int i = 0; i < t->nheld; i++) if (t->held[i].key == key) return i;
    return -1;
}

static void held_remove(Thread *t, int i) {
    held_clear(&t->held[i]);
    memmove(&t->held[i], &t->held[i + 1], sizeof(Held) * (t->nheld - i - 1));
    t->nheld--;
}

static int holder_is(Core *self, uint64_t key, int slot) {
    PyObject *k = key_object(key);
    PyObject *v = k ? PyDict_GetItemWithError(self->holder, k) : NULL;
    int is = v && PyLong_AsLong(v) == slot;
    Py_XDECREF(k);
    PyErr_Clear();
    return is;
}

/* broker._release */
static void holder_del(Core *self, uint64_t key) {
    PyObject *k = key_object(key);
    if (k && PyDict_DelItem(self->holder, k) < 0) PyErr_Clear();
    if (k && PySet_GET_SIZE(self->streams) && PySet_Discard(self->streams, k) < 0) PyErr_Clear();
    Py_XDECREF(k);
}

/* broker._assign, then the dispatcher's _send */
static void assign(Core *self, int slot, uint64_t key, PyObject *sender, PyObject *raw) {
    Thread *t = &self->threads[slot];
    t->credits--;
    if (t->nheld == t->capheld) {
        int cap = t->capheld ? t->capheld * 2 : 4;
        Held *held = realloc(t->held, sizeof(Held) * cap);
        if (!held) { PyErr_NoMemory(); return; }
        t->held = held;
        t->capheld = cap;
    }
    Held *h = &t->held[t->nheld++];
    h->key = key;
    h->sender = Py_NewRef(sender);
    h->raw = Py_NewRef(raw);
    h->since = monotonic();
    PyObject *k = key_object(key), *s = PyLong_FromLong(slot);
    if (!k || !s || PyDict_SetItem(self->holder, k, s) < 0) PyErr_Clear();
    Py_XDECREF(k);
    Py_XDECREF(s);
    file_thread(self, slot);
    send_request(self, slot, (int)(key >> 40), key, raw, 'Q');
}

static PyObject *waiting_tuple(int index, PyObject *sender, PyObject *conn_id, double age, int running, int behind,
                               PyObject *raw) {
    return Py_BuildValue("(iOOdNNO)", index, sender, conn_id, age, PyBool_FromLong(running), PyBool_FromLong(behind),
                         raw);
}

static void answer(Core *self, PyObject *orphan, int status) {
    PyObject *list = orphan ? PyList_New(1) : NULL;
    if (!list) { Py_XDECREF(orphan); PyErr_Clear(); return; }
    PyList_SET_ITEM(list, 0, orphan);
    glue_notify(self, str_answer, "(Ni)", list, status);
}

/* broker.request: give the request to a thread, park it behind its connection's, or queue it. */
static void request(Core *self, int index, PyObject *sender, uint64_t key, PyObject *conn_id, PyObject *raw) {
    PyObject *k = key_object(key);
    if (!k) { PyErr_Clear(); return; }
    int held = PyDict_Contains(self->holder, k);
    if (held == 1 && PySet_GET_SIZE(self->streams) && PySet_Contains(self->streams, k) == 1) {
        PyObject *holder = PyDict_GetItemWithError(self->holder, k);
        int slot = holder ? (int)PyLong_AsLong(holder) : -1;
        Py_DECREF(k);
        PyErr_Clear();
        if (slot >= 0) send_request(self, slot, index, key, raw, 'C');
        return;
    }
    if (held == 1) {
        PyObject *queue = PyDict_GetItemWithError(self->parked, k);
        if (!queue) {
            queue = PyList_New(0);
            if (queue && PyDict_SetItem(self->parked, k, queue) < 0) Py_CLEAR(queue);
            Py_XDECREF(queue);  /* the dict holds it */
        }
        PyObject *item = Py_BuildValue("(OO)", sender, raw);
        if (queue && item) PyList_Append(queue, item);
        Py_XDECREF(item);
        Py_DECREF(k);
        PyErr_Clear();
        return;
    }
    if (PyDict_GET_SIZE(self->closed)) {
        PyObject *when = PyDict_GetItemWithError(self->closed, k);
        if (when && monotonic() - PyFloat_AsDouble(when) < CLOSED_MEMORY) {
            PyObject *own_id = conn_id ? Py_NewRef(conn_id) : conn_id_bytes(key);
            PyObject *tuple = own_id ? waiting_tuple(index, sender, own_id, 0.0, 0, 1, raw) : NULL;
            if (!tuple || PyList_Append(self->dropped, tuple) < 0) PyErr_Clear();
            Py_XDECREF(tuple);
            Py_XDECREF(own_id);
            Py_DECREF(k);
            return;
        }
        if (when && PyDict_DelItem(self->closed, k) < 0) PyErr_Clear();
        PyErr_Clear();
    }
    Py_DECREF(k);
    int slot = pick(self);
    if (slot >= 0) {
        assign(self, slot, key, sender, raw);
        return;
    }
    if (self->bl_len >= MAX_BACKLOG) {
        PyObject *own_id = conn_id ? Py_NewRef(conn_id) : conn_id_bytes(key);
        answer(self, waiting_tuple(index, sender, own_id, 0.0, 0, 0, raw), 503);
        Py_XDECREF(own_id);
        return;
    }
    if (self->bl_len == self->bl_cap) {
        int cap = self->bl_cap ? self->bl_cap * 2 : 64;
        Waiting *ring = malloc(sizeof(Waiting) * cap);
        if (!ring) { PyErr_NoMemory(); PyErr_Clear(); return; }
        for (int i = 0; i < self->bl_len; i++) ring[i] = self->backlog[(self->bl_head + i) % self->bl_cap];
        free(self->backlog);
        self->backlog = ring;
        self->bl_cap = cap;
        self->bl_head = 0;
    }
    Waiting *w = &self->backlog[(self->bl_head + self->bl_len++) % self->bl_cap];
    w->index = index;
    w->sender = Py_NewRef(sender);
    w->conn_id = conn_id ? Py_NewRef(conn_id) : conn_id_bytes(key);
    w->raw = Py_NewRef(raw);
}

static uint64_t make_key(int index, PyObject *conn_id) {
    uint64_t conn = strtoull(PyBytes_AS_STRING(conn_id), NULL, 10);
    return ((uint64_t)index << 40) | conn;
}

/* broker._drain_backlog */
static void drain_backlog(Core *self) {
    while (self->bl_len && (self->idle.head >= 0 || self->spare.head >= 0)) {
        Waiting w = self->backlog[self->bl_head];
        self->bl_head = (self->bl_head + 1) % self->bl_cap;
        self->bl_len--;
        request(self, w.index, w.sender, make_key(w.index, w.conn_id), w.conn_id, w.raw);
        Py_DECREF(w.sender);
        Py_DECREF(w.conn_id);
        Py_DECREF(w.raw);
    }
}

/* broker.credit */
static void broker_credit(Core *self, PyObject *ident, long pid, long count) {
    int slot = thread_slot(self, ident);
    if (slot < 0) {
        PyErr_Clear();
        PyObject *p = PyLong_FromLong(pid);
        int gone = p ? PyDict_Contains(self->gone, p) : -1;
        if (gone != 0) {
            /* A credit still in the socket when its worker was reaped: handing
             * that thread a request would lose it, with nobody left to answer. */
            Py_XDECREF(p);
            PyErr_Clear();
            return;
        }
        slot = thread_new(self, ident, pid);
        if (slot < 0 || PyDict_SetDefault(self->served, p, zero) == NULL) PyErr_Clear();
        Py_DECREF(p);
        if (slot < 0) return;
    }
    Thread *t = &self->threads[slot];
    if (t->retiring) return;
    t->credits += count;
    file_thread(self, slot);
    drain_backlog(self);
}

/* broker._remember_closed */
static void remember_closed(Core *self, PyObject *k) {
    PyObject *now = PyFloat_FromDouble(monotonic());
    if (!now) { PyErr_Clear(); return; }
    if (PyDict_DelItem(self->closed, k) < 0) PyErr_Clear();  /* to the end: oldest first */
    if (PyDict_SetItem(self->closed, k, now) < 0) PyErr_Clear();
    Py_DECREF(now);
    if (PyDict_GET_SIZE(self->closed) > MAX_CLOSED) {
        Py_ssize_t pos = 0;
        PyObject *oldest, *value;
        if (PyDict_Next(self->closed, &pos, &oldest, &value)) {
            Py_INCREF(oldest);
            if (PyDict_DelItem(self->closed, oldest) < 0) PyErr_Clear();
            Py_DECREF(oldest);
        }
    }
}

/* broker.forget_closed */
static void forget_closed(Core *self, int index) {
    PyObject *keys = PyDict_Keys(self->closed);
    if (!keys) { PyErr_Clear(); return; }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(keys); i++) {
        PyObject *k = PyList_GET_ITEM(keys, i);
        if ((int)(PyLong_AsUnsignedLongLong(k) >> 40) == index && PyDict_DelItem(self->closed, k) < 0) PyErr_Clear();
    }
    Py_DECREF(keys);
    PyErr_Clear();
}

/* broker.done */
static void broker_done(Core *self, PyObject *ident, int index, PyObject *conn_id, int credit, int closed) {
    int slot = thread_slot(self, ident);
    if (slot < 0) { PyErr_Clear(); return; }
    uint64_t key = make_key(index, conn_id);
    Thread *t = &self->threads[slot];
    int i = held_index(t, key);
    if (i >= 0) {
        held_remove(t, i);
        PyObject *p = PyLong_FromLong(t->pid);
        PyObject *count = p ? PyDict_GetItemWithError(self->served, p) : NULL;
        PyObject *more = count ? PyNumber_Add(count, one) : NULL;
        if (!more || PyDict_SetItem(self->served, p, more) < 0) PyErr_Clear();
        Py_XDECREF(more);
        Py_XDECREF(p);
    }
    if (holder_is(self, key, slot)) holder_del(self, key);
    if (credit && !t->retiring) t->credits += 1 + t->owed;
    t->owed = 0;
    file_thread(self, slot);
    PyObject *k = key_object(key);
    if (k && closed) {
        remember_closed(self, k);
        PyObject *behind = PyDict_GetItemWithError(self->parked, k);
        for (Py_ssize_t i = 0; behind && i < PyList_GET_SIZE(behind); i++) {
            PyObject *item = PyList_GET_ITEM(behind, i);
            PyObject *tuple = waiting_tuple(index, PyTuple_GET_ITEM(item, 0), conn_id, 0.0, 0, 1,
                                            PyTuple_GET_ITEM(item, 1));
            if (!tuple || PyList_Append(self->dropped, tuple) < 0) PyErr_Clear();
            Py_XDECREF(tuple);
        }
        if (behind && PyDict_DelItem(self->parked, k) < 0) PyErr_Clear();
        PyErr_Clear();
    }
    PyObject *queue = k ? PyDict_GetItemWithError(self->parked, k) : NULL;
    if (queue && PyList_GET_SIZE(queue)) {
        PyObject *item = Py_NewRef(PyList_GET_ITEM(queue, 0));
        PySequence_DelItem(queue, 0);
        if (!PyList_GET_SIZE(queue)) PyDict_DelItem(self->parked, k);
        request(self, index, PyTuple_GET_ITEM(item, 0), key, conn_id, PyTuple_GET_ITEM(item, 1));
        Py_DECREF(item);
    }
    Py_XDECREF(k);
    PyErr_Clear();
    drain_backlog(self);
}

/* broker.give_back */
static void broker_give_back(Core *self, PyObject *ident, int index, PyObject *conn_id) {
    int slot = thread_slot(self, ident);
    if (slot < 0) { PyErr_Clear(); return; }
    uint64_t key = make_key(index, conn_id);
    Thread *t = &self->threads[slot];
    int i = held_index(t, key);
    if (i < 0 || is_stream(self, key)) return;
    PyObject *sender = Py_NewRef(t->held[i].sender), *raw = Py_NewRef(t->held[i].raw);
    held_remove(t, i);
    if (holder_is(self, key, slot)) holder_del(self, key);
    double now = monotonic();
    if (now - self->give_backs_from >= 1.0) {
        self->give_backs = 0;
        self->give_backs_from = now;
    }
    if (++self->give_backs >= PAUSE_AFTER) self->packs_again_at = now + self->pack_pause;
    if (!t->retiring) t->owed++;
    file_thread(self, slot);  /* out of the tiers (it owes, or retires): not back to where it was stuck */
    backlog_push_front(self, index, sender, Py_NewRef(conn_id), raw);
    Py_DECREF(raw);
    drain_backlog(self);
}

/* broker.stream */
static void broker_stream(Core *self, PyObject *ident, int index, PyObject *conn_id) {
    int slot = thread_slot(self, ident);
    if (slot < 0) { PyErr_Clear(); return; }
    uint64_t key = make_key(index, conn_id);
    if (!holder_is(self, key, slot)) return;  /* not (or no longer) its connection */
    PyObject *k = key_object(key);
    if (!k || PySet_Add(self->streams, k) < 0) { PyErr_Clear(); Py_XDECREF(k); return; }
    PyObject *queue = PyDict_GetItemWithError(self->parked, k);
    if (queue) {
        Py_INCREF(queue);
        PyDict_DelItem(self->parked, k);
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(queue); i++)
            send_request(self, slot, index, key, PyTuple_GET_ITEM(PyList_GET_ITEM(queue, i), 1), 'C');
        Py_DECREF(queue);
    }
    Py_DECREF(k);
    PyErr_Clear();
}

/* broker.retire */
static void broker_retire(Core *self, PyObject *ident) {
    int slot = thread_slot(self, ident);
    if (slot < 0) { PyErr_Clear(); return; }
    Thread *t = &self->threads[slot];
    t->retiring = 1;
    t->credits = 0;
    tier_remove(self, slot);
}

/* _backlog.appendleft: a request that was given to a thread and comes back goes first.
 * Takes the references to sender and conn_id. */
static void backlog_push_front(Core *self, int index, PyObject *sender, PyObject *conn_id, PyObject *raw) {
    if (!conn_id) { PyErr_Clear(); Py_DECREF(sender); return; }
    if (self->bl_len == self->bl_cap) {
        int cap = self->bl_cap ? self->bl_cap * 2 : 64;
        Waiting *ring = malloc(sizeof(Waiting) * cap);
        if (!ring) { Py_DECREF(sender); Py_DECREF(conn_id); return; }
        for (int j = 0; j < self->bl_len; j++) ring[j] = self->backlog[(self->bl_head + j) % self->bl_cap];
        free(self->backlog);
        self->backlog = ring;
        self->bl_cap = cap;
        self->bl_head = 0;
    }
    self->bl_head = (self->bl_head + self->bl_cap - 1) % self->bl_cap;
    self->bl_len++;
    Waiting *w = &self->backlog[self->bl_head];
    w->index = index;
    w->sender = sender;
    w->conn_id = conn_id;
    w->raw = Py_NewRef(raw);
}

/* The dispatcher's _send; on a link that is gone, broker.unreachable. */
static void send_request(Core *self, int slot, int index, uint64_t key, PyObject *raw, char kind) {
    Thread *t = &self->threads[slot];
    char head[2] = {kind, (char)index};
    const char *frames[3] = {head, PyBytes_AS_STRING(raw), NULL};
    size_t sizes[3] = {2, (size_t)PyBytes_GET_SIZE(raw), 0};
    int n = 2;
    char balance_text[32];
    if (kind == 'Q') {
        PyObject *k = key_object(key);
        PyObject *balance = k ? PyDict_GetItemWithError(self->balance, k) : NULL;
        if (balance) {
            long long value = PyLong_AsLongLong(balance);
            sizes[2] = (size_t)snprintf(balance_text, sizeof(balance_text), "%lld", value);
            frames[2] = balance_text;
            n = 3;
        }
        Py_XDECREF(k);
        PyErr_Clear();
    }
    PyObject *ident = Py_NewRef(t->ident);
    if (link_send(self, ident, frames, sizes, n) || kind != 'Q') {
        Py_DECREF(ident);
        return;
    }
    /* broker.unreachable: the thread's process is gone; undo and queue again */
    int i = held_index(t, key);
    PyObject *sender = i >= 0 ? Py_NewRef(t->held[i].sender) : NULL;
    if (i >= 0) held_remove(t, i);
    t->credits = 0;
    t->retiring = 1;
    tier_remove(self, slot);
    if (holder_is(self, key, slot)) holder_del(self, key);
    Py_DECREF(ident);
    if (!sender) return;
    backlog_push_front(self, index, sender, conn_id_bytes(key), raw);
}

/* -- Mongrel2 -> workers ----------------------------------------------------------- */

static int sender_char(unsigned char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-';
}

/* codec.peek_route: 0 and the parts, or -1 with a reason. */
static int peek_route(const char *p, size_t n, size_t *sender_end, size_t *conn_start, size_t *conn_end,
                      int *is_control, const char **reason) {
    const char *space = memchr(p, ' ', n);
    if (!space) { *reason = "expected 'SENDER CONN_ID PATH HEADERS BODY', found 0 of 3 spaces"; return -1; }
    size_t s_end = (size_t)(space - p);
    const char *space2 = memchr(space + 1, ' ', n - s_end - 1);
    if (!space2) { *reason = "expected 'SENDER CONN_ID PATH HEADERS BODY', found 1 of 3 spaces"; return -1; }
    size_t c_start = s_end + 1, c_end = (size_t)(space2 - p);
    const char *space3 = memchr(space2 + 1, ' ', n - c_end - 1);
    if (!space3) { *reason = "expected 'SENDER CONN_ID PATH HEADERS BODY', found 2 of 3 spaces"; return -1; }
    if (s_end == 0 || s_end > MAX_SENDER) {
        *reason = "sender is not [A-Za-z0-9-]{1,256}: Mongrel2 would drop any reply to it";
        return -1;
    }
    for (size_t i = 0; i < s_end; i++) {
        if (!sender_char((unsigned char)p[i])) {
            *reason = "sender is not [A-Za-z0-9-]{1,256}: Mongrel2 would drop any reply to it";
            return -1;
        }
    }
    size_t digits = c_end - c_start;
    if (digits == 0 || digits > MAX_CONN_DIGITS || (p[c_start] == '0' && digits > 1)) {
        *reason = "conn id is not a decimal number";
        return -1;
    }
    for (size_t i = c_start; i < c_end; i++) {
        if (p[i] < '0' || p[i] > '9') { *reason = "conn id is not a decimal number"; return -1; }
    }
    size_t path_len = (size_t)(space3 - space2) - 1;
    *is_control = path_len == 2 && space2[1] == '@' && space2[2] == '*';
    *sender_end = s_end;
    *conn_start = c_start;
    *conn_end = c_end;
    return 0;
}

/* The dispatcher's _control: flow-control credits, then the thread serving that connection. */
static void from_mongrel2_control(Core *self, int index, uint64_t key, PyObject *raw) {
    PyObject *k = key_object(key);
    if (!k) { PyErr_Clear(); return; }
    if (PyDict_Contains(self->balance, k) == 1) {
        PyObject *event = glue_call(self, str_control_event, "(iO)", index, raw);
        if (!event || event == Py_None || !PyTuple_Check(event) || PyTuple_GET_SIZE(event) < 1) {
            Py_XDECREF(event);
            Py_DECREF(k);
            return;  /* malformed: the glue said why */
        }
        PyObject *kind = PyTuple_GET_ITEM(event, 0);
        if (PyUnicode_Check(kind) && PyUnicode_Compare(kind, str_credits) == 0 && PyTuple_GET_SIZE(event) > 1) {
            PyObject *balance = PyDict_GetItemWithError(self->balance, k);
            PyObject *more = balance ? PyNumber_Add(balance, PyTuple_GET_ITEM(event, 1)) : NULL;
            if (more) PyDict_SetItem(self->balance, k, more);
            Py_XDECREF(more);
        } else if (PyUnicode_Check(kind) && PyUnicode_Compare(kind, str_disconnect) == 0) {
            PyDict_DelItem(self->balance, k);
        }
        Py_DECREF(event);
        PyErr_Clear();
    }
    PyObject *holder = PyDict_GetItemWithError(self->holder, k);
    int slot = holder ? (int)PyLong_AsLong(holder) : -1;
    Py_DECREF(k);
    PyErr_Clear();
    if (slot >= 0) send_request(self, slot, index, key, raw, 'C');
}

static void from_mongrel2(Core *self, int index, const char *message, size_t n) {
    PyObject *raw = PyBytes_FromStringAndSize(message, (Py_ssize_t)n);
    if (!raw) { PyErr_Clear(); return; }
    const char *p = PyBytes_AS_STRING(raw);  /* from here on: the glue may free `message` */
    size_t s_end, c_start, c_end;
    int is_control;
    const char *reason;
    if (peek_route(p, n, &s_end, &c_start, &c_end, &is_control, &reason) < 0) {
        glue_notify(self, str_on_rejected, "(iOs)", index, raw, reason);
        Py_DECREF(raw);
        return;
    }
    uint64_t conn = 0;
    for (size_t i = c_start; i < c_end; i++) conn = conn * 10 + (uint64_t)(p[i] - '0');
    uint64_t key = ((uint64_t)index << 40) | conn;
    if (is_control) {
        from_mongrel2_control(self, index, key, raw);
        Py_DECREF(raw);
        return;
    }
    if (memmem(p, n, "DOWNLOAD_CREDITS", 16)) {
        PyObject *credits = glue_call(self, str_request_credits, "(iO)", index, raw);
        if (credits && credits != Py_None) {
            PyObject *k = key_object(key);
            if (!k || !PyDict_SetDefault(self->balance, k, credits)) PyErr_Clear();
            Py_XDECREF(k);
        }
        Py_XDECREF(credits);
    }
    PyObject *sender = PyBytes_FromStringAndSize(p, (Py_ssize_t)s_end);
    PyObject *conn_id = PyBytes_FromStringAndSize(p + c_start, (Py_ssize_t)(c_end - c_start));
    if (!sender || !conn_id) {
        PyErr_Clear();
    } else if (!self->accepting) {
        answer(self, waiting_tuple(index, sender, conn_id, 0.0, 0, 0, raw), 503);
    } else {
        request(self, index, sender, key, conn_id, raw);
    }
    Py_XDECREF(sender);
    Py_XDECREF(conn_id);
    Py_DECREF(raw);
}

static void mongrel2_close(Core *self, int index) {
    Mongrel2 *m = &self->mongrel2[index];
    if (m->fd < 0) return;
    epoll_ctl(self->epfd, EPOLL_CTL_DEL, m->fd, NULL);
    close(m->fd);
    m->fd = -1;
    m->in_multipart = 0;
    buf_free(&m->in);
}

/* zmtp.FrameReader: the complete single-frame messages in m->in. */
static void mongrel2_frames(Core *self, int index) {
    Mongrel2 *m = &self->mongrel2[index];
    while (m->fd >= 0 && buf_len(&m->in) >= 2) {
        const unsigned char *p = (const unsigned char *)m->in.p + m->in.start;
        size_t avail = buf_len(&m->in), head, size;
        unsigned char flags = p[0];
        if (flags & 0x02) {
            if (avail < 9) break;
            size = 0;
            for (int i = 1; i < 9; i++) size = (size << 8) | p[i];
            if (size > MAX_FRAME) {
                glue_notify(self, str_on_rejected, "(iys)", index, "", "broken ZMTP stream (a frame too large)");
                mongrel2_close(self, index);
                glue_notify(self, str_on_lost, "(i)", index);
                return;
            }
            head = 9;
        } else {
            size = p[1];
            head = 2;
        }
        if (avail < head + size) break;
        if (flags & 0x04) {
            /* a command (PING, SUBSCRIBE): nothing for us */
        } else if ((flags & 0x01) || m->in_multipart) {
            if (!m->in_multipart)
                glue_notify(self, str_on_rejected, "(iys)", index, "", "a multi-part message (Mongrel2 sends single frames)");
            m->in_multipart = flags & 0x01;
        } else {
            /* Consumed first: from_mongrel2 copies the message before it calls
             * the glue, which may close this connection (and free the buffer). */
            size_t at = m->in.start + head;
            buf_consume(&m->in, head + size);
            from_mongrel2(self, index, m->in.p + at, size);
            continue;
        }
        buf_consume(&m->in, head + size);
    }
}

static void mongrel2_read(Core *self, int index) {
    Mongrel2 *m = &self->mongrel2[index];
    if (buf_reserve(&m->in, RECV_SIZE) < 0) { PyErr_Clear(); return; }
    ssize_t got = recv(m->fd, m->in.p + m->in.end, RECV_SIZE, MSG_DONTWAIT);
    if (got < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (got <= 0) {
        mongrel2_close(self, index);
        glue_notify(self, str_on_lost, "(i)", index);
        return;
    }
    m->in.end += (size_t)got;
    mongrel2_frames(self, index);
}

/* -- workers -> dispatcher ------------------------------------------------------------ */

static void from_worker(Core *self, Conn *conn, PyObject **frames, int n) {
    if (!conn->ident) {
        if (n == 2 && PyBytes_GET_SIZE(frames[0]) == 1 && PyBytes_AS_STRING(frames[0])[0] == 'H') {
            conn->ident = Py_NewRef(frames[1]);
            Conn *old = conn_of_ident(self, conn->ident);
            PyErr_Clear();
            if (old && old != conn) conn_drop(self, old);
            PyObject *fd = PyLong_FromLong(conn->fd);
            if (!fd || PyDict_SetItem(self->by_ident, conn->ident, fd) < 0) PyErr_Clear();
            Py_XDECREF(fd);
        } else {
            glue_notify(self, str_on_unknown, "(yy)", "", "H");  /* a link that did not introduce itself */
            conn_drop(self, conn);
        }
        return;
    }
    PyObject *ident = Py_NewRef(conn->ident);
    const char *head = PyBytes_AS_STRING(frames[0]);
    Py_ssize_t head_len = PyBytes_GET_SIZE(frames[0]);
    char kind = head_len ? head[0] : 0;
    if ((kind == '=' || kind == '-') && head_len >= 2 && n >= 2) {
        int index = (unsigned char)head[1];
        int closed = 0;
        if (n > 2) {  /* bytes sent (a flow-controlled response), "c" if it closed the connection */
            const char *report = PyBytes_AS_STRING(frames[2]);
            Py_ssize_t size = PyBytes_GET_SIZE(frames[2]);
            closed = size && report[size - 1] == 'c';
            long long sent = strtoll(report, NULL, 10);
            PyObject *k = key_object(make_key(index, frames[1]));
            if (k && closed) {
                if (PyDict_DelItem(self->balance, k) < 0) PyErr_Clear();
            } else if (k) {
                PyObject *balance = PyDict_GetItemWithError(self->balance, k);
                if (balance) {
                    PyObject *left = PyLong_FromLongLong(PyLong_AsLongLong(balance) - sent);
                    if (left) PyDict_SetItem(self->balance, k, left);
                    Py_XDECREF(left);
                }
            }
            Py_XDECREF(k);
            PyErr_Clear();
        }
        broker_done(self, ident, index, frames[1], kind == '=', closed);
    } else if (kind == '<' && head_len >= 2 && n >= 2) {
        broker_give_back(self, ident, (unsigned char)head[1], frames[1]);
    } else if (kind == 'W' && head_len >= 2 && n >= 2) {
        broker_stream(self, ident, (unsigned char)head[1], frames[1]);
    } else if (kind == '+' && n >= 2) {
        const char *id = PyBytes_AS_STRING(ident);
        long pid = strtol(id, NULL, 10);
        broker_credit(self, ident, pid, strtol(PyBytes_AS_STRING(frames[1]), NULL, 10));
    } else if (kind == '!') {
        broker_retire(self, ident);
        const char *frames_out[1] = {"!"};
        size_t sizes[1] = {1};
        link_send(self, ident, frames_out, sizes, 1);
    } else if (kind == 'R') {
        long pid = strtol(PyBytes_AS_STRING(ident), NULL, 10);
        if (n > 1 && PyBytes_GET_SIZE(frames[1])) {
            PyObject *version = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(frames[1]), PyBytes_GET_SIZE(frames[1]),
                                                     "replace");
            if (version) glue_notify(self, str_on_ready, "(lN)", pid, version);
            else PyErr_Clear();
        } else {
            glue_notify(self, str_on_ready, "(lO)", pid, Py_None);
        }
    } else if (kind == 'F' && n >= 2) {
        glue_notify(self, str_on_figures, "(lO)", strtol(PyBytes_AS_STRING(ident), NULL, 10), frames[1]);
    } else {
        glue_notify(self, str_on_unknown, "(Oy#)", ident, head, head_len ? (Py_ssize_t)1 : (Py_ssize_t)0);
    }
    Py_DECREF(ident);
}

static void conn_read(Core *self, Conn *conn) {
    if (buf_reserve(&conn->in, RECV_SIZE) < 0) { PyErr_Clear(); return; }
    ssize_t got = recv(conn->fd, conn->in.p + conn->in.end, RECV_SIZE, MSG_DONTWAIT);
    if (got < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (got <= 0) { conn_drop(self, conn); return; }
    conn->in.end += (size_t)got;
    int fd = conn->fd;
    while (buf_len(&conn->in) >= 4) {
        const char *p = conn->in.p + conn->in.start;
        uint32_t total = get_u32(p);
        if (buf_len(&conn->in) < 4 + (size_t)total) break;
        PyObject *frames[8];
        int n = 0;
        size_t pos = 4, end = 4 + total;
        int bad = 0;
        while (pos < end) {
            if (end - pos < 4) { bad = 1; break; }
            uint32_t size = get_u32(p + pos);
            pos += 4;
            if (size > end - pos || n == 8) { bad = 1; break; }
            frames[n] = PyBytes_FromStringAndSize(p + pos, size);
            if (!frames[n]) { bad = 1; PyErr_Clear(); break; }
            n++;
            pos += size;
        }
        buf_consume(&conn->in, end);
        if (!bad && n) from_worker(self, conn, frames, n);
        for (int i = 0; i < n; i++) Py_DECREF(frames[i]);
        if (bad || self->conns[fd] != conn) {
            if (bad && self->conns[fd] == conn) conn_drop(self, conn);
            return;
        }
    }
}

static void accept_links(Core *self) {
    for (;;) {
        int fd = accept4(self->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return;
        if (fd >= self->nconns_cap) {
            int cap = self->nconns_cap ? self->nconns_cap : 64;
            while (cap <= fd) cap *= 2;
            Conn **conns = realloc(self->conns, sizeof(Conn *) * cap);
            if (!conns) { close(fd); return; }
            memset(conns + self->nconns_cap, 0, sizeof(Conn *) * (cap - self->nconns_cap));
            self->conns = conns;
            self->nconns_cap = cap;
        }
        Conn *conn = calloc(1, sizeof(Conn));
        if (!conn) { close(fd); return; }
        conn->fd = fd;
        self->conns[fd] = conn;
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = EV_DATA(TAG_CONN, fd)};
        epoll_ctl(self->epfd, EPOLL_CTL_ADD, fd, &ev);
    }
}

/* -- the loop -------------------------------------------------------------------- */

static void pump(Core *self, struct epoll_event *events, int n) {
    /* DONEs first: they free the threads new requests need */
    for (int i = 0; i < n; i++) {
        uint32_t tag = (uint32_t)(events[i].data.u64 >> 32), value = (uint32_t)events[i].data.u64;
        if (tag == TAG_LISTENER) {
            accept_links(self);
        } else if (tag == TAG_CONN) {
            Conn *conn = (int)value < self->nconns_cap ? self->conns[value] : NULL;
            if (!conn) continue;
            if (events[i].events & EPOLLOUT) conn_flush(self, conn);
            conn = self->conns[value];
            if (conn && (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) conn_read(self, conn);
        }
    }
    for (int i = 0; i < n; i++) {
        uint32_t tag = (uint32_t)(events[i].data.u64 >> 32), value = (uint32_t)events[i].data.u64;
        if (tag == TAG_WAKE) {
            uint64_t count;
            if (read(self->wake_fd, &count, sizeof(count)) < 0) { /* nothing to clear */ }
        } else if (tag == TAG_MONGREL2) {
            if ((int)value < self->nmongrel2 && self->mongrel2[value].fd >= 0) mongrel2_read(self, (int)value);
        } else if (tag == TAG_WATCHED) {
            glue_notify(self, str_on_fd, "(i)", (int)value);
        }
    }
    links_flush(self);
    if (PyList_GET_SIZE(self->dropped)) {
        PyObject *dropped = self->dropped;
        self->dropped = PyList_New(0);
        if (!self->dropped) { PyErr_Clear(); self->dropped = dropped; return; }
        glue_notify(self, str_dropped, "(N)", dropped);
    }
}

/* One pass: wait up to timeout_ms, handle the batch; events handled, -1 once stopped, -2 on error. */
static int run_once(Core *self, int timeout_ms) {
    struct epoll_event events[MAX_EVENTS];
    int n, error = 0;
    Py_BEGIN_ALLOW_THREADS
    n = epoll_wait(self->epfd, events, MAX_EVENTS, timeout_ms);
    if (n < 0) error = errno;
    pthread_mutex_lock(&self->mutex);
    Py_END_ALLOW_THREADS
    if (self->stopping) {
        UNLOCK(self);
        return -1;
    }
    if (n < 0 && error != EINTR) {
        UNLOCK(self);
        errno = error;
        PyErr_SetFromErrno(PyExc_OSError);
        return -2;
    }
    if (n > 0) pump(self, events, n);
    double now = monotonic();
    if (now - self->ticked_at >= GLUE_TICK) {
        self->ticked_at = now;
        glue_notify(self, str_on_tick, "(d)", now);
    }
    UNLOCK(self);
    return n > 0 ? n : 0;
}

static PyObject *Core_run(Core *self, PyObject *unused) {
    int n;
    while ((n = run_once(self, TICK_MS)) >= 0) {}
    if (n == -2) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Core_run_once(Core *self, PyObject *arg) {
    double timeout = PyFloat_AsDouble(arg);
    if (timeout == -1.0 && PyErr_Occurred()) return NULL;
    int n = run_once(self, (int)(timeout * 1000));
    if (n == -2) return NULL;
    return PyLong_FromLong(n);
}

static PyObject *Core_stop(Core *self, PyObject *unused) {
    self->stopping = 1;
    uint64_t one = 1;
    if (write(self->wake_fd, &one, sizeof(one)) < 0) { /* the loop still sees the flag at its next tick */ }
    Py_RETURN_NONE;
}

/* -- connections (the glue's) ------------------------------------------------------ */

static PyObject *Core_attach(Core *self, PyObject *args) {
    int index, fd;
    Py_buffer rest;
    if (!PyArg_ParseTuple(args, "iiy*", &index, &fd, &rest)) return NULL;
    if (index < 0 || index >= self->nmongrel2) {
        PyBuffer_Release(&rest);
        return PyErr_Format(PyExc_IndexError, "no endpoint %d", index);
    }
    LOCK(self);
    mongrel2_close(self, index);
    forget_closed(self, index);
    Mongrel2 *m = &self->mongrel2[index];
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    m->fd = fd;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = EV_DATA(TAG_MONGREL2, index)};
    epoll_ctl(self->epfd, EPOLL_CTL_ADD, fd, &ev);
    if (rest.len && buf_append(&m->in, rest.buf, (size_t)rest.len) == 0) {
        mongrel2_frames(self, index);
        links_flush(self);
    }
    PyErr_Clear();
    UNLOCK(self);
    PyBuffer_Release(&rest);
    Py_RETURN_NONE;
}

static PyObject *Core_shut_down_sending(Core *self, PyObject *arg) {
    int index = (int)PyLong_AsLong(arg);
    if (index == -1 && PyErr_Occurred()) return NULL;
    LOCK(self);
    if (index >= 0 && index < self->nmongrel2 && self->mongrel2[index].fd >= 0)
        shutdown(self->mongrel2[index].fd, SHUT_WR);
    UNLOCK(self);
    Py_RETURN_NONE;
}

static PyObject *Core_close_endpoint(Core *self, PyObject *arg) {
    int index = (int)PyLong_AsLong(arg);
    if (index == -1 && PyErr_Occurred()) return NULL;
    LOCK(self);
    if (index >= 0 && index < self->nmongrel2) mongrel2_close(self, index);
    UNLOCK(self);
    Py_RETURN_NONE;
}

static PyObject *Core_watch(Core *self, PyObject *args) {
    int fd, writable;
    if (!PyArg_ParseTuple(args, "ip", &fd, &writable)) return NULL;
    LOCK(self);
    PyObject *key = PyLong_FromLong(fd);
    int known = key ? PySet_Contains(self->watched, key) : -1;
    struct epoll_event ev = {.events = writable ? EPOLLOUT : EPOLLIN, .data.u64 = EV_DATA(TAG_WATCHED, fd)};
    int failed = epoll_ctl(self->epfd, known == 1 ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, fd, &ev);
    if (!failed && known == 0) PySet_Add(self->watched, key);
    Py_XDECREF(key);
    UNLOCK(self);
    if (failed) return PyErr_SetFromErrno(PyExc_OSError);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Core_unwatch(Core *self, PyObject *arg) {
    int fd = (int)PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    LOCK(self);
    if (PySet_Discard(self->watched, arg) == 1) epoll_ctl(self->epfd, EPOLL_CTL_DEL, fd, NULL);
    PyErr_Clear();
    UNLOCK(self);
    Py_RETURN_NONE;
}

static PyObject *Core_endpoint_open(Core *self, PyObject *arg) {
    int index = (int)PyLong_AsLong(arg);
    if (index == -1 && PyErr_Occurred()) return NULL;
    return PyBool_FromLong(index >= 0 && index < self->nmongrel2 && self->mongrel2[index].fd >= 0);
}

/* -- the supervisor's questions ------------------------------------------------------ */

static PyObject *Core_worker_started(Core *self, PyObject *pid) {
    LOCK(self);
    if (PyDict_DelItem(self->gone, pid) < 0) PyErr_Clear();
    UNLOCK(self);
    Py_RETURN_NONE;
}

static int by_order(const void *a, const void *b, void *threads) {
    uint64_t x = ((Thread *)threads)[*(const int *)a].order, y = ((Thread *)threads)[*(const int *)b].order;
    return x < y ? -1 : x > y;
}

/* The used slots of a pid's threads, in creation order; the caller frees. */
static int *pid_slots(Core *self, long pid, int *count) {
    int *slots = malloc(sizeof(int) * (self->nthreads + 1));
    *count = 0;
    if (!slots) return NULL;
    for (int i = 0; i < self->nthreads; i++)
        if (self->threads[i].used && self->threads[i].pid == pid) slots[(*count)++] = i;
    qsort_r(slots, *count, sizeof(int), by_order, self->threads);
    return slots;
}

static PyObject *Core_worker_gone(Core *self, PyObject *arg) {
    long pid = PyLong_AsLong(arg);
    if (pid == -1 && PyErr_Occurred()) return NULL;
    PyObject *orphans = PyList_New(0);
    if (!orphans) return NULL;
    LOCK(self);
    if (PyDict_SetItem(self->gone, arg, Py_None) == 0 && PyDict_GET_SIZE(self->gone) > MAX_GONE_PIDS) {
        Py_ssize_t pos = 0;
        PyObject *oldest, *value;
        if (PyDict_Next(self->gone, &pos, &oldest, &value)) {
            Py_INCREF(oldest);
            PyDict_DelItem(self->gone, oldest);
            Py_DECREF(oldest);
        }
    }
    int count;
    int *slots = pid_slots(self, pid, &count);
    for (int s = 0; slots && s < count; s++) {
        Thread *t = &self->threads[slots[s]];
        double now = monotonic();
        /* A thread serves what it holds in the order it got it: the first is
         * the one it was running, the others were waiting behind it. */
        for (int i = 0; i < t->nheld; i++) {
            Held *h = &t->held[i];
            PyObject *conn_id = conn_id_bytes(h->key);
            PyObject *orphan = conn_id ? waiting_tuple((int)(h->key >> 40), h->sender, conn_id, now - h->since,
                                                       i == 0, 0, h->raw) : NULL;
            Py_XDECREF(conn_id);
            if (orphan) { PyList_Append(orphans, orphan); Py_DECREF(orphan); }
            if (holder_is(self, h->key, slots[s])) holder_del(self, h->key);
            /* Pipelined requests behind it die with the connection we close. */
            PyObject *k = key_object(h->key);
            PyObject *queue = k ? PyDict_GetItemWithError(self->parked, k) : NULL;
            if (queue) {
                Py_INCREF(queue);
                PyDict_DelItem(self->parked, k);
                for (Py_ssize_t j = 0; j < PyList_GET_SIZE(queue); j++) {
                    PyObject *item = PyList_GET_ITEM(queue, j);
                    PyObject *cid = conn_id_bytes(h->key);
                    PyObject *behind = cid ? waiting_tuple((int)(h->key >> 40), PyTuple_GET_ITEM(item, 0), cid, 0.0,
                                                           0, 1, PyTuple_GET_ITEM(item, 1)) : NULL;
                    Py_XDECREF(cid);
                    if (behind) { PyList_Append(orphans, behind); Py_DECREF(behind); }
                }
                Py_DECREF(queue);
            }
            Py_XDECREF(k);
        }
        thread_free(self, slots[s]);
    }
    free(slots);
    PyErr_Clear();
    UNLOCK(self);
    return orphans;
}

static PyObject *Core_retire_worker(Core *self, PyObject *arg) {
    long pid = PyLong_AsLong(arg);
    if (pid == -1 && PyErr_Occurred()) return NULL;
    LOCK(self);
    for (int i = 0; i < self->nthreads; i++) {
        Thread *t = &self->threads[i];
        if (t->used && t->pid == pid) {
            t->retiring = 1;
            t->credits = 0;
            tier_remove(self, i);
        }
    }
    UNLOCK(self);
    Py_RETURN_NONE;
}

static PyObject *Core_served(Core *self, PyObject *pid) {
    LOCK(self);
    PyObject *count = PyDict_GetItemWithError(self->served, pid);
    Py_XINCREF(count);
    UNLOCK(self);
    if (count) return count;
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Core_total_served(Core *self, PyObject *unused) {
    LOCK(self);
    PyObject *total = PyLong_FromLong(0);
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (total && PyDict_Next(self->served, &pos, &key, &value)) {
        PyObject *sum = PyNumber_Add(total, value);
        Py_DECREF(total);
        total = sum;
    }
    UNLOCK(self);
    return total;
}

static PyObject *Core_busy_threads(Core *self, PyObject *args) {
    long pid;
    double stuck_after = INFINITY;
    if (!PyArg_ParseTuple(args, "l|d", &pid, &stuck_after)) return NULL;
    LOCK(self);
    double now = monotonic();
    long busy = 0;
    for (int i = 0; i < self->nthreads; i++) {
        Thread *t = &self->threads[i];
        if (t->used && t->pid == pid && t->nheld && now - t->held[0].since < stuck_after) busy++;
    }
    UNLOCK(self);
    return PyLong_FromLong(busy);
}

static PyObject *Core_oldest_request_age(Core *self, PyObject *arg) {
    long pid = PyLong_AsLong(arg);
    if (pid == -1 && PyErr_Occurred()) return NULL;
    LOCK(self);
    double oldest = INFINITY;
    for (int i = 0; i < self->nthreads; i++) {
        Thread *t = &self->threads[i];
        if (!t->used || t->pid != pid) continue;
        for (int j = 0; j < t->nheld; j++) {
            if (PySet_GET_SIZE(self->streams)) {  /* a WebSocket is no stuck request (broker.oldest_request_age) */
                PyObject *k = key_object(t->held[j].key);
                int stream = k ? PySet_Contains(self->streams, k) : 0;
                Py_XDECREF(k);
                PyErr_Clear();
                if (stream == 1) continue;
            }
            if (t->held[j].since < oldest) oldest = t->held[j].since;
        }
    }
    double now = monotonic();
    UNLOCK(self);
    if (oldest == INFINITY) Py_RETURN_NONE;
    return PyFloat_FromDouble(now - oldest);
}

static PyObject *Core_take_waiting(Core *self, PyObject *unused) {
    PyObject *waiting = PyList_New(0);
    if (!waiting) return NULL;
    LOCK(self);
    while (self->bl_len) {
        Waiting w = self->backlog[self->bl_head];
        self->bl_head = (self->bl_head + 1) % self->bl_cap;
        self->bl_len--;
        PyObject *orphan = waiting_tuple(w.index, w.sender, w.conn_id, 0.0, 0, 0, w.raw);
        if (orphan) { PyList_Append(waiting, orphan); Py_DECREF(orphan); }
        Py_DECREF(w.sender);
        Py_DECREF(w.conn_id);
        Py_DECREF(w.raw);
    }
    Py_ssize_t pos = 0;
    PyObject *key, *queue;
    while (PyDict_Next(self->parked, &pos, &key, &queue)) {
        uint64_t k = PyLong_AsUnsignedLongLong(key);
        for (Py_ssize_t j = 0; j < PyList_GET_SIZE(queue); j++) {
            PyObject *item = PyList_GET_ITEM(queue, j);
            PyObject *cid = conn_id_bytes(k);
            PyObject *orphan = cid ? waiting_tuple((int)(k >> 40), PyTuple_GET_ITEM(item, 0), cid, 0.0, 0, 0,
                                                   PyTuple_GET_ITEM(item, 1)) : NULL;
            Py_XDECREF(cid);
            if (orphan) { PyList_Append(waiting, orphan); Py_DECREF(orphan); }
        }
    }
    PyDict_Clear(self->parked);
    PyErr_Clear();
    UNLOCK(self);
    return waiting;
}

static PyObject *Core_get_backlog(Core *self, void *closure) {
    LOCK(self);
    long n = self->bl_len;
    UNLOCK(self);
    return PyLong_FromLong(n);
}

static PyObject *Core_get_accepting(Core *self, void *closure) { return PyBool_FromLong(self->accepting); }

static int Core_set_accepting(Core *self, PyObject *value, void *closure) {
    int truth = value ? PyObject_IsTrue(value) : 0;
    if (truth < 0) return -1;
    LOCK(self);
    self->accepting = truth;
    UNLOCK(self);
    return 0;
}

static PyObject *Core_get_lock(Core *self, void *closure) { return Py_NewRef(self); }

static PyObject *Core_enter(Core *self, PyObject *unused) {
    LOCK(self);
    Py_RETURN_NONE;
}

static PyObject *Core_exit(Core *self, PyObject *args) {
    UNLOCK(self);
    Py_RETURN_FALSE;
}

/* -- life ---------------------------------------------------------------------------- */

static int Core_init(Core *self, PyObject *args, PyObject *kwds) {
    const char *path;
    int endpoints;
    PyObject *glue;
    static char *kwlist[] = {"link_path", "endpoints", "glue", "pack_within", "pack_pause", NULL};
    double pack_within = PACK_WITHIN, pack_pause = PACK_PAUSE;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "siO|dd", kwlist, &path, &endpoints, &glue, &pack_within,
                                     &pack_pause))
        return -1;
    if (endpoints < 0 || endpoints > 255) {
        PyErr_SetString(PyExc_ValueError, "endpoints must be 0..255");
        return -1;
    }
    if (self->initialized) {
        PyErr_SetString(PyExc_RuntimeError, "Core.__init__ called twice");
        return -1;
    }
    self->initialized = 1;
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&self->mutex, &attr);
    pthread_mutexattr_destroy(&attr);
    self->epfd = self->listen_fd = self->wake_fd = -1;
    self->glue = Py_NewRef(glue);
    self->idle.head = self->idle.tail = self->spare.head = self->spare.tail = -1;
    self->accepting = 1;
    self->pack_within = pack_within;
    self->pack_pause = pack_pause;
    self->by_ident = PyDict_New();
    self->watched = PySet_New(NULL);
    self->thread_of = PyDict_New();
    self->holder = PyDict_New();
    self->parked = PyDict_New();
    self->streams = PySet_New(NULL);
    self->served = PyDict_New();
    self->gone = PyDict_New();
    self->balance = PyDict_New();
    self->closed = PyDict_New();
    self->dropped = PyList_New(0);
    if (!self->by_ident || !self->watched || !self->thread_of || !self->holder || !self->parked || !self->streams
        || !self->served
        || !self->gone || !self->balance || !self->closed || !self->dropped) return -1;
    self->nmongrel2 = endpoints;
    self->mongrel2 = calloc(endpoints ? endpoints : 1, sizeof(Mongrel2));
    if (!self->mongrel2) { PyErr_NoMemory(); return -1; }
    for (int i = 0; i < endpoints; i++) self->mongrel2[i].fd = -1;

    struct sockaddr_un address = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(address.sun_path)) {
        PyErr_Format(PyExc_ValueError, "link path too long: %s", path);
        return -1;
    }
    strcpy(address.sun_path, path);
    self->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (self->listen_fd < 0 || bind(self->listen_fd, (struct sockaddr *)&address, sizeof(address)) < 0
        || listen(self->listen_fd, 512) < 0) {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
        return -1;
    }
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    self->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (self->epfd < 0 || self->wake_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = EV_DATA(TAG_LISTENER, 0)};
    epoll_ctl(self->epfd, EPOLL_CTL_ADD, self->listen_fd, &ev);
    ev.data.u64 = EV_DATA(TAG_WAKE, 0);
    epoll_ctl(self->epfd, EPOLL_CTL_ADD, self->wake_fd, &ev);
    return 0;
}

static PyObject *Core_close(Core *self, PyObject *unused) {
    LOCK(self);
    for (int i = 0; i < self->nmongrel2; i++) mongrel2_close(self, i);
    for (int fd = 0; fd < self->nconns_cap; fd++) {
        Conn *conn = self->conns[fd];
        if (!conn) continue;
        close(conn->fd);
        Py_CLEAR(conn->ident);
        buf_free(&conn->in);
        buf_free(&conn->out);
        free(conn);
        self->conns[fd] = NULL;
    }
    if (self->listen_fd >= 0) close(self->listen_fd);
    if (self->epfd >= 0) close(self->epfd);
    if (self->wake_fd >= 0) close(self->wake_fd);
    self->listen_fd = self->epfd = self->wake_fd = -1;
    UNLOCK(self);
    Py_RETURN_NONE;
}

static void Core_dealloc(Core *self) {
    if (!self->initialized) {
        Py_TYPE(self)->tp_free((PyObject *)self);
        return;
    }
    if (self->epfd >= 0 || self->listen_fd >= 0) {
        PyObject *r = Core_close(self, NULL);
        Py_XDECREF(r);
    }
    for (int i = 0; i < self->nthreads; i++) if (self->threads[i].used) thread_free(self, i);
    free(self->threads);
    for (int i = 0; i < self->bl_len; i++) {
        Waiting *w = &self->backlog[(self->bl_head + i) % self->bl_cap];
        Py_DECREF(w->sender);
        Py_DECREF(w->conn_id);
        Py_DECREF(w->raw);
    }
    free(self->backlog);
    free(self->mongrel2);
    free(self->conns);
    free(self->dirty);
    Py_XDECREF(self->glue);
    Py_XDECREF(self->by_ident);
    Py_XDECREF(self->watched);
    Py_XDECREF(self->thread_of);
    Py_XDECREF(self->holder);
    Py_XDECREF(self->parked);
    Py_XDECREF(self->streams);
    Py_XDECREF(self->served);
    Py_XDECREF(self->gone);
    Py_XDECREF(self->balance);
    Py_XDECREF(self->closed);
    Py_XDECREF(self->dropped);
    pthread_mutex_destroy(&self->mutex);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Core_methods[] = {
    {"run", (PyCFunction)Core_run, METH_NOARGS, "The loop, until stop()."},
    {"run_once", (PyCFunction)Core_run_once, METH_O, "One pass: wait up to timeout s; events handled, -1 if stopped."},
    {"stop", (PyCFunction)Core_stop, METH_NOARGS, "Make run() return (from any thread)."},
    {"close", (PyCFunction)Core_close, METH_NOARGS, "Close every socket (after run() returned)."},
    {"attach", (PyCFunction)Core_attach, METH_VARARGS, "attach(index, fd, rest): read Mongrel2 index from fd."},
    {"shut_down_sending", (PyCFunction)Core_shut_down_sending, METH_O, "Half-close Mongrel2 index."},
    {"close_endpoint", (PyCFunction)Core_close_endpoint, METH_O, "Close Mongrel2 index."},
    {"endpoint_open", (PyCFunction)Core_endpoint_open, METH_O, "Whether Mongrel2 index is attached."},
    {"watch", (PyCFunction)Core_watch, METH_VARARGS, "watch(fd, writable): glue.on_fd(fd) when ready."},
    {"unwatch", (PyCFunction)Core_unwatch, METH_O, "Stop watching fd."},
    {"worker_started", (PyCFunction)Core_worker_started, METH_O, NULL},
    {"worker_gone", (PyCFunction)Core_worker_gone, METH_O, "The orphans of a dead worker."},
    {"retire_worker", (PyCFunction)Core_retire_worker, METH_O, NULL},
    {"served", (PyCFunction)Core_served, METH_O, NULL},
    {"total_served", (PyCFunction)Core_total_served, METH_NOARGS, NULL},
    {"busy_threads", (PyCFunction)Core_busy_threads, METH_VARARGS, NULL},
    {"oldest_request_age", (PyCFunction)Core_oldest_request_age, METH_O, NULL},
    {"take_waiting", (PyCFunction)Core_take_waiting, METH_NOARGS, NULL},
    {"__enter__", (PyCFunction)Core_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Core_exit, METH_VARARGS, NULL},
    {NULL},
};

static PyGetSetDef Core_getset[] = {
    {"backlog", (getter)Core_get_backlog, NULL, "Requests waiting for a thread.", NULL},
    {"accepting", (getter)Core_get_accepting, (setter)Core_set_accepting, "False: new requests get 503.", NULL},
    {"lock", (getter)Core_get_lock, NULL, "The core's (reentrant) lock, as a context manager.", NULL},
    {NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fleet.dispatch._core.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The dispatcher's hot loop (see fleet/dispatch/core.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
    .tp_getset = Core_getset,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "fleet.dispatch._core",
                                    "The dispatcher's hot loop in C.", -1, NULL};

PyMODINIT_FUNC PyInit__core(void) {
    if (PyType_Ready(&CoreType) < 0) return NULL;
    if (!(zero = PyLong_FromLong(0)) || !(one = PyLong_FromLong(1))) return NULL;
#define INTERN(var, text) if (!(var = PyUnicode_InternFromString(text))) return NULL
    INTERN(str_on_tick, "on_tick");
    INTERN(str_on_fd, "on_fd");
    INTERN(str_on_lost, "on_lost");
    INTERN(str_on_ready, "on_ready");
    INTERN(str_on_figures, "on_figures");
    INTERN(str_on_rejected, "on_rejected");
    INTERN(str_on_unknown, "on_unknown");
    INTERN(str_answer, "answer");
    INTERN(str_request_credits, "request_credits");
    INTERN(str_control_event, "control_event");
    INTERN(str_credits, "credits");
    INTERN(str_disconnect, "disconnect");
    INTERN(str_dropped, "dropped");
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "Core", (PyObject *)&CoreType) < 0) return NULL;
    PyModule_AddIntConstant(m, "MAX_BACKLOG", MAX_BACKLOG);
    PyModule_AddIntConstant(m, "MAX_GONE_PIDS", MAX_GONE_PIDS);
    PyModule_AddIntConstant(m, "MAX_CLOSED", MAX_CLOSED);
    PyModule_AddObject(m, "CLOSED_MEMORY", PyFloat_FromDouble(CLOSED_MEMORY));
    PyModule_AddObject(m, "PACK_WITHIN", PyFloat_FromDouble(PACK_WITHIN));
    PyModule_AddObject(m, "PACK_PAUSE", PyFloat_FromDouble(PACK_PAUSE));
    PyModule_AddIntConstant(m, "PAUSE_AFTER", PAUSE_AFTER);
    return m;
}
