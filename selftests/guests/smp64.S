/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Two vCPUs on one set of page tables (a flat binary at 0x100000; RDI = vCPU index at
 * entry, long mode with rvmm's identity map). vCPU 0 remaps a page N times (a write to a
 * shadowed page table, then INVLPG), vCPU 1 flushes with a CR3 load after each and must
 * read the new page's value. vCPU 0 ends with OUT 0xf4 = 0x2a if every read matched
 * (0x2b if not), vCPU 1 with HLT.
 */
	.intel_syntax noprefix
	.code64
	.text
	.globl _start
	.set T, 0x400000		/* PML4, PDPT, PD, PT */
	.set FRAMES, 0x600000		/* frame k holds the byte k */
	.set VA, 0x8000000000
	.set READY, 0x500000
	.set FLAG, 0x500040
	.set ACK, 0x500080
	.set ERR, 0x5000c0
	.set N, 200
_start:
	test	rdi, rdi
	jnz	reader
	mov	ecx, 1
1:	mov	rax, rcx
	shl	rax, 12
	mov	[FRAMES + rax], cl
	inc	ecx
	cmp	ecx, N + 1
	jne	1b
	mov	rax, [0x1000]
	mov	[T], rax
	mov	qword ptr [T + 8], T + 0x1000 + 3
	mov	qword ptr [T + 0x1000], T + 0x2000 + 3
	mov	qword ptr [T + 0x2000], T + 0x3000 + 3
	mov	qword ptr [T + 0x3000], FRAMES + 0x1000 + 3
	mov	rax, T
	mov	cr3, rax
	mov	byte ptr [READY], 1
	movabs	rsi, VA
	mov	ecx, 1
2:	mov	rax, rcx
	shl	rax, 12
	add	rax, FRAMES + 3
	mov	[T + 0x3000], rax	/* a write to a shadowed page table */
	invlpg	[rsi]
	cmp	[rsi], cl
	jne	bad
	mov	[FLAG], ecx
3:	pause
	cmp	[ACK], ecx
	jne	3b
	inc	ecx
	cmp	ecx, N + 1
	jne	2b
	cmp	dword ptr [ERR], 0
	jne	bad
	mov	al, 0x2a
	out	0xf4, al
	hlt
bad:
	mov	al, 0x2b
	out	0xf4, al
	hlt

reader:
4:	pause
	cmp	byte ptr [READY], 1
	jne	4b
	mov	rax, T
	mov	cr3, rax
	movabs	rsi, VA
	xor	edx, edx		/* last value seen */
5:	pause
	mov	ecx, [FLAG]
	cmp	ecx, edx
	je	5b
	mov	edx, ecx
	mov	rax, cr3		/* flush: MOV CR3 */
	mov	cr3, rax
	cmp	[rsi], cl
	je	6f
	mov	[ERR], ecx
6:	mov	[ACK], ecx
	cmp	ecx, N
	jne	5b
	hlt
