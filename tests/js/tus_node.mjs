// Drives the real tus-js-client (Node build) for tests/integration/test_tus_js.py.
//
// Why a separate process per step: a phone or browser tab that resumes an upload after a
// crash has nothing but the upload URL it stored; running "create + abort" and "resume" in
// two Node processes proves exactly that, with no client state carried over in memory.
//
// Input: one JSON object on stdin (or as argv[2]). Output: one JSON object on stdout.
//   {"action": "upload", "file": path, "endpoint"?: url, "uploadUrl"?: url, "chunkSize": n,
//    "protocol"?: "tus-v1"|"ietf-draft-03"|"ietf-draft-05", "metadata"?: {...},
//    "abortAfterChunks"?: n,   abort() from onChunkComplete once n chunks were acknowledged
//    "cutInChunk"?: n, "cutAfterBytes"?: k,  the PATCH of chunk n+1 gets only k body bytes onto the wire,
//                              then abort() (a connection lost mid-chunk; see limitSocket)
//    "uploadDataDuringCreation"?: bool,  the first chunk rides on the creation POST
//    "terminate"?: bool,       abort(true) instead of abort(): DELETE the upload resource
//    "timeoutMs"?: n}
//   -> {"outcome": "success"|"aborted"|"error", "url", "firstProgress", "chunks", "requests", "error"?}
//   {"action": "terminate", "url": url, "protocol"?: ...} -> {"outcome": "terminated"|"error", ...}
import { readFileSync } from 'node:fs'
import * as net from 'node:net'
import * as tus from 'tus-js-client'

const REQUEST_HEADERS = ['Tus-Resumable', 'Upload-Draft-Interop-Version', 'Upload-Offset', 'Upload-Length',
  'Upload-Complete', 'Content-Type', 'Upload-Metadata']
const RESPONSE_HEADERS = ['Tus-Resumable', 'Upload-Draft-Interop-Version', 'Upload-Offset', 'Upload-Length',
  'Upload-Complete', 'Location', 'Upload-Limit', 'Content-Type']

function pick(getter, names) {
  const out = {}
  for (const name of names) {
    const value = getter(name)
    if (value !== undefined && value !== null) out[name] = String(value)
  }
  return out
}

function describeError(err) {
  const out = { error: String(err && err.message ? err.message : err) }
  const res = err && err.originalResponse
  if (res) {
    out.status = res.getStatus()
    out.body = String(res.getBody() || '').slice(0, 500)
  }
  return out
}

function finish(result) {
  // Exit explicitly: Node's keep-alive agent would keep the process alive on idle sockets.
  process.stdout.write(`${JSON.stringify(result)}\n`, () => process.exit(0))
}

// limitSocket lets `budget` body bytes of the next request through and then holds the rest back,
// as a phone that loses its network mid-request would; `onCut` fires once the budget is spent.
// Why at the socket: tus-js-client's own progress events are throttled and fire before the bytes
// leave the process, so aborting from onProgress cuts nothing the server ever sees.
function limitSocket(socket, budget, onCut) {
  const write = socket.write.bind(socket)
  let seen = Buffer.alloc(0) // bytes before the end of the request head
  let allowed = null // total bytes (head + body) that may pass
  let passed = 0
  socket.write = (chunk, encoding, callback) => {
    if (typeof encoding === 'function') {
      callback = encoding
      encoding = undefined
    }
    const buf = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk, encoding || 'utf8')
    if (allowed === null) {
      seen = Buffer.concat([seen, buf])
      const headEnd = seen.indexOf('\r\n\r\n')
      if (headEnd >= 0) allowed = headEnd + 4 + budget
    }
    const room = allowed === null ? buf.length : Math.max(0, allowed - passed)
    if (room >= buf.length) {
      passed += buf.length
      return write(buf, callback)
    }
    if (room > 0) write(buf.subarray(0, room))
    passed += room
    if (onCut) {
      const cut = onCut
      onCut = null
      cut()
    }
    return false // never drains: the request stalls until abort() destroys the socket
  }
}

function upload(cfg) {
  return new Promise((resolve) => {
    const data = readFileSync(cfg.file)
    const chunkSize = cfg.chunkSize
    const requests = []
    const chunks = []
    let firstProgress = null
    let settled = false
    let up = null

    const done = (outcome, extra = {}) => {
      if (settled) return
      settled = true
      resolve({ outcome, url: up ? up.url : null, firstProgress, chunks, requests, ...extra })
    }
    let armed = false
    let cutBodyBytes = null
    const createConnection = (opts) => {
      const socket = net.createConnection(opts)
      if (armed) {
        armed = false
        // Wait before tearing the connection down: the server must have read what got through
        // before the test's HEAD arrives (a HEAD takes over the upload from a stale PATCH).
        limitSocket(socket, cfg.cutAfterBytes, () => {
          cutBodyBytes = cfg.cutAfterBytes
          setTimeout(stop, 500)
        })
      }
      return socket
    }
    let stopped = false
    const stop = () => {
      if (stopped) return
      stopped = true
      const aborting = up.abort(Boolean(cfg.terminate))
      aborting.then(() => done('aborted', { terminated: Boolean(cfg.terminate), cutBodyBytes }),
        (err) => done('error', { phase: 'abort', ...describeError(err) }))
    }

    const options = {
      endpoint: cfg.endpoint || null,
      uploadUrl: cfg.uploadUrl || null,
      protocol: cfg.protocol || 'tus-v1',
      chunkSize,
      metadata: cfg.metadata || {},
      uploadDataDuringCreation: Boolean(cfg.uploadDataDuringCreation),
      retryDelays: null, // a server error must show up in the test, not be retried away
      storeFingerprintForResuming: false,
      onBeforeRequest: (req) => {
        const sent = pick((h) => req.getHeader(h), REQUEST_HEADERS)
        requests.push({ method: req.getMethod(), url: req.getURL(), sent })
        const offset = Number(sent['Upload-Offset'])
        if (cfg.cutInChunk != null && req.getMethod() === 'PATCH' && offset === cfg.cutInChunk * chunkSize) {
          armed = true
        }
      },
      onAfterResponse: (req, res) => {
        const entry = requests.findLast((r) => r.method === req.getMethod() && r.status === undefined)
        if (entry) {
          entry.status = res.getStatus()
          entry.received = pick((h) => res.getHeader(h), RESPONSE_HEADERS)
        }
      },
      onProgress: (bytesSent) => {
        if (firstProgress === null) firstProgress = bytesSent
      },
      onChunkComplete: (_size, accepted) => {
        chunks.push(accepted)
        if (cfg.abortAfterChunks != null && chunks.length >= cfg.abortAfterChunks && accepted < data.length) stop()
      },
      onSuccess: () => done('success'),
      onError: (err) => done('error', describeError(err)),
    }
    if (cfg.cutInChunk != null) {
      // Only for the cut: one fresh connection per request, so the cut hits exactly one PATCH.
      options.httpStack = new tus.DefaultHttpStack({ createConnection })
    }
    up = new tus.Upload(data, options)
    up.start()
  })
}

async function terminate(cfg) {
  try {
    await tus.Upload.terminate(cfg.url, { protocol: cfg.protocol || 'tus-v1', retryDelays: null })
    return { outcome: 'terminated' }
  } catch (err) {
    return { outcome: 'error', ...describeError(err) }
  }
}

const cfg = JSON.parse(process.argv[2] || readFileSync(0, 'utf8'))
const limitMs = cfg.timeoutMs || 60000
const timer = setTimeout(() => finish({ outcome: 'error', error: `driver timed out after ${limitMs} ms` }), limitMs)
const actions = { upload, terminate }
if (!(cfg.action in actions)) {
  finish({ outcome: 'error', error: `unknown action ${cfg.action}` })
} else {
  actions[cfg.action](cfg).then((result) => {
    clearTimeout(timer)
    finish({ ...result, clientVersion: tusVersion() })
  })
}

function tusVersion() {
  try {
    return JSON.parse(readFileSync(new URL('./node_modules/tus-js-client/package.json', import.meta.url))).version
  } catch {
    return null
  }
}
