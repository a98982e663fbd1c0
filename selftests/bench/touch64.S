/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Benchmark: guest-measured TSC ticks per first touch of a fresh 4-KiB page (a shadow
 * page fault under rvmm and KVM ept=0; an EPT violation under ept=1) (in Bochs, ticks count
 * emulated instructions, guest and host together). Prints "touch ticks/op: N".
 */
	.intel_syntax noprefix
	.code64
	.text
	.globl _start
	.set N, 2048
_start:
	/* Warm up: fault in the code and stack pages. */
	xor	eax, eax
	cpuid
	rdtsc
	shl	rdx, 32
	or	rax, rdx
	mov	r12, rax
	mov	r13d, N
	mov	rdi, 0x400000
1:	mov	byte ptr [rdi], 1
	add	rdi, 0x1000
	dec	r13d
	jnz	1b
	rdtsc
	shl	rdx, 32
	or	rax, rdx
	sub	rax, r12
	xor	edx, edx
	mov	rcx, N
	div	rcx
	mov	r12, rax
	lea	rsi, [rip + msg]
	call	puts
	mov	rax, r12
	call	putdec
	mov	al, '\n'
	call	putc
	mov	al, 0
	out	0xf4, al
	hlt

/* putdec(rax) */
putdec:
	lea	rdi, [rip + buf + 31]
	mov	byte ptr [rdi], 0
	mov	rcx, 10
2:	xor	edx, edx
	div	rcx
	add	dl, '0'
	dec	rdi
	mov	[rdi], dl
	test	rax, rax
	jnz	2b
	mov	rsi, rdi
puts:
	lodsb
	test	al, al
	jz	3f
	call	putc
	jmp	puts
3:	ret
putc:
	mov	dx, 0x3f8
	out	dx, al
	ret

	.data
msg:	.asciz	"touch ticks/op: "
buf:	.space	32
